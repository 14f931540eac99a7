"""The Kubeflow Pipelines backend a profile needs (flywheel.kfp.backend), and `submit` /
`schedule create` holding the server's version (healthz `tag_name`) against it before anything
is uploaded. The server is the KFP API stand-in (tests/standin_kfp.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standin_kfp import KfpStandIn
from test_kfp_client import READY, package  # noqa: F401  (a trivial compiled pipeline)

from flywheel.config import CONFIG_DIR, load_profile
from flywheel.errors import FlywheelError
from flywheel.kfp import client as kfp_client
from flywheel.kfp.backend import (
    FEATURES,
    MIN_BACKEND,
    check_backend,
    parse_version,
    required_backend,
)
from flywheel.kfp.client import KfpSession, KfpTarget

CLUSTER = CONFIG_DIR / "cluster.yaml"
SUB_PATH = "kfp.kubernetes.pvcs=[{name: hf-cache, mount_path: /models, sub_path: lm}]"
HEALTHZ = ("GET", "/apis/v2beta1/healthz")


# ------------------------------------------------------------------------ pure


def test_release_tags_parse_and_anything_else_does_not():
    assert parse_version("2.15.0") == (2, 15, 0)
    assert parse_version("v2.16.1") == (2, 16, 1)
    assert parse_version(" 2.17.0\n") == (2, 17, 0)
    for tag in (None, "", "unknown", "2.15", "2.15.0-rc.1", "2.14.0-12-gabc1234", "master"):
        assert parse_version(tag) is None, tag


def test_every_feature_names_a_release_and_a_reference():
    for feature in FEATURES:
        assert parse_version(feature.since), feature
        assert feature.ref and feature.name
    assert parse_version(MIN_BACKEND) == (2, 15, 0)


def test_the_cluster_profile_needs_the_minimum_and_a_pvc_sub_path_raises_it():
    need = required_backend(load_profile(CLUSTER))
    assert need.version == MIN_BACKEND
    assert "kubeflow/pipelines#12495" in {f.ref for f in need.features}
    with_sub_path = required_backend(load_profile(CLUSTER, [SUB_PATH]))
    assert with_sub_path.version == "2.16.0"
    assert any("sub_path" in f.name for f in with_sub_path.features)
    # A profile that names no Secret still gets the project's floor: nothing older is tested.
    assert required_backend(load_profile(CLUSTER, ["kfp.kubernetes.secrets=[]"])).version == (
        MIN_BACKEND
    )


def test_the_verdicts_older_refused_equal_or_newer_accepted_no_release_warned():
    need = required_backend(load_profile(CLUSTER))
    older = check_backend("http://h", "2.14.0", need)
    assert older.refusal and not older.warning
    assert "is 2.14.0" in older.refusal and "needs 2.15.0 or newer" in older.refusal
    assert "kubeflow/pipelines#12495" in older.refusal and "\n" not in older.refusal
    # the features the server lacks are named, not those it has
    assert "#11953" not in older.refusal
    for tag in ("2.15.0", "v2.15.0", "2.16.3", "3.0.0"):
        assert check_backend("http://h", tag, need) == type(older)(), tag
    for tag in (None, "unknown", "2.15.0-rc.1", "dev\nbuild"):
        verdict = check_backend("http://h", tag, need)
        assert verdict.warning and not verdict.refusal
        assert "2.15.0 or newer" in verdict.warning and "\n" not in verdict.warning
    no_secrets = required_backend(load_profile(CLUSTER, ["kfp.kubernetes.secrets=[]"]))
    floor = check_backend("http://h", "2.14.0", no_secrets)
    assert floor.refusal and f"Flywheel supports {MIN_BACKEND} and newer" in floor.refusal


# ------------------------------------------------------------- against a server


@pytest.fixture
def ready(state_dir, monkeypatch):
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)


def _args(command: str, url: str, package) -> list[str]:  # noqa: F811
    tail = ["--host", url, "--package", str(package)]
    if command == "submit":
        return ["submit", "retrain", *READY, *tail]
    return ["schedule", "create", "monitor", *READY, "--cron", "0 3 * * *", *tail]


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_an_older_backend_is_refused_in_one_line_before_anything_is_uploaded(
    contracts_dir,
    package,  # noqa: F811
    ready,
    cli,
    command,
):
    with KfpStandIn(contracts_dir, tag_name="2.14.0") as kfp:
        code, _, err = cli(*_args(command, kfp.url, package))
        assert kfp.violations == []
    assert code == 1 and len(err) == 1, err
    assert "2.14.0" in err[0] and "2.15.0 or newer" in err[0] and "Traceback" not in err[0]
    assert [(r.method, r.path) for r in kfp.requests] == [HEALTHZ]
    assert kfp.pipelines == {} and kfp.runs == {} and kfp.recurring == {}


@pytest.mark.parametrize("tag", ["2.15.0", "v2.16.0", "2.17.1"])
@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_the_minimum_or_newer_is_accepted_without_a_word(
    contracts_dir,
    package,  # noqa: F811
    ready,
    cli,
    command,
    tag,
):
    with KfpStandIn(contracts_dir, tag_name=tag) as kfp:
        code, _, err = cli(*_args(command, kfp.url, package))
        assert kfp.violations == []
    assert code == 0, err
    assert len(kfp.runs) + len(kfp.recurring) == 1
    assert not [line for line in err if "warning" in line], err
    assert (kfp.requests[0].method, kfp.requests[0].path) == HEALTHZ
    assert len(kfp.calls("GET", r"/healthz$")) == 1


@pytest.mark.parametrize("tag", [None, "unknown"])
def test_a_server_without_a_release_version_warns_in_one_line_and_submits(
    contracts_dir,
    package,  # noqa: F811
    ready,
    cli,
    tag,
):
    with KfpStandIn(contracts_dir, tag_name=tag) as kfp:
        code, _, err = cli(*_args("submit", kfp.url, package))
    assert code == 0, err
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "2.15.0 or newer" in warnings[0], err
    assert (tag or "no tag_name") in warnings[0]
    assert len(kfp.runs) == 1


def test_a_profile_with_a_pvc_sub_path_is_refused_by_a_2_15_server(
    contracts_dir,
    package,  # noqa: F811
    ready,
    cli,
):
    with KfpStandIn(contracts_dir, tag_name="2.15.0") as kfp:
        code, _, err = cli(*_args("submit", kfp.url, package), SUB_PATH)
    assert code == 1 and len(err) == 1, err
    assert "is 2.15.0" in err[0] and "needs 2.16.0 or newer" in err[0] and "sub_path" in err[0]
    assert "#12495" not in err[0]  # a 2.15 server has that one
    assert kfp.pipelines == {}


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_dry_run_lists_the_version_check_first(
    package,  # noqa: F811
    ready,
    cli,
    command,
):
    with socket.socket() as s:  # a port nothing listens on: a dry run connects to nothing
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, out, err = cli(*_args(command, url, package), "--dry-run")
    assert code == 0, err
    first = json.loads(out)["requests"][0]
    assert (first["method"], first["path"]) == HEALTHZ and "when" not in first
    assert "older than 2.15.0" in first["checks"] and "multi-user" in first["checks"]


def _serve(handler_body: bytes | None):
    """A server whose every GET answers 200 with `handler_body`, or never answers (None)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if handler_body is None:
                time.sleep(3)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(handler_body)))
            self.end_headers()
            self.wfile.write(handler_body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_health_check_times_out(monkeypatch):
    monkeypatch.setattr(kfp_client, "HEALTHZ_TIMEOUT_S", (0.5, 0.5))
    server = _serve(None)
    try:
        start = time.monotonic()
        with pytest.raises(FlywheelError, match=r"\(health check\): timed out"):
            KfpSession(KfpTarget(f"http://127.0.0.1:{server.server_address[1]}"))
        assert time.monotonic() - start < 2.5  # one try, not urllib3's retries
    finally:
        server.shutdown()
        server.server_close()


def test_a_health_check_that_answers_a_login_page_is_one_line():
    server = _serve(b"<html><body>Sign in</body></html>")
    try:
        with pytest.raises(FlywheelError, match="did not answer JSON") as err:
            KfpSession(KfpTarget(f"http://127.0.0.1:{server.server_address[1]}"))
        assert "\n" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
