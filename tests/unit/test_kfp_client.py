"""The real kfp.Client, through flywheel.kfp.client, against the KFP API STAND-IN
(tests/standin_kfp.py), which validates every request against the official v2beta1 spec."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from standin_kfp import ContractChecker, HttpError, KfpStandIn

from flywheel.cli.main import main
from flywheel.config import KfpConfig, load_profile
from flywheel.errors import ConfigError, FlywheelError
from flywheel.kfp.client import (
    KfpSession,
    KfpTarget,
    resolve_target,
    schedule,
    submit,
)

TOKEN = "tok-3c7e1d9f-secret"
# What `flywheel submit` needs beyond the default profile (the guard refuses pod-local state).
READY = [
    "registry.tracking_uri=http://mlflow.example:5000",
    "tune.storage=postgresql+psycopg2://optuna@pg.example:5432/optuna",
    "storage.root=s3://bucket/flywheel",
]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A trivial compiled pipeline with the run knobs Flywheel's pipelines take."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(profile: dict, trigger_reason: str, data_location: str) -> str:
        return f"{trigger_reason} {data_location} {len(profile)}"

    @dsl.pipeline(name="toy")
    def toy(profile: dict, trigger_reason: str = "manual", data_location: str = ""):
        echo(profile=profile, trigger_reason=trigger_reason, data_location=data_location)

    path = tmp_path_factory.mktemp("pkg") / "toy.yaml"
    compiler.Compiler().compile(toy, str(path))
    return path


@pytest.fixture
def profile(state_dir):
    return load_profile(None, ["train.max_steps=7"])


@pytest.fixture
def kfp(contracts_dir):
    with KfpStandIn(contracts_dir, token=TOKEN) as server:
        yield server
        assert server.violations == [], server.violations


@pytest.fixture
def session(kfp):
    return KfpSession(KfpTarget(kfp.url, token=TOKEN))


def test_submit_uploads_creates_experiment_and_run_with_parameters(kfp, session, profile, package):
    run = submit(
        session, profile, "retrain", package, trigger_reason="drift: 0.91", data_location="/data/w"
    )
    assert run.url == f"{kfp.url}/#/runs/details/{run.run_id}"
    assert run.pipeline.uploaded and run.pipeline.pipeline_name == "flywheel-retrain"
    assert len(kfp.calls("POST", r"/pipelines/upload$")) == 1
    created = kfp.runs[run.run_id]
    params = created["runtime_config"]["parameters"]
    assert params["trigger_reason"] == "drift: 0.91"
    assert params["data_location"] == "/data/w"
    assert params["profile"]["train"]["max_steps"] == 7  # the whole profile, as one dict
    assert created["pipeline_version_reference"]["pipeline_version_id"] == run.pipeline.version_id
    assert kfp.experiments[run.experiment_id]["display_name"] == "flywheel"


def test_same_package_is_not_uploaded_twice_and_a_new_one_is(
    kfp, session, profile, package, tmp_path
):
    first = submit(session, profile, "retrain", package)
    second = submit(session, profile, "retrain", package)
    assert not second.pipeline.uploaded
    assert second.pipeline.version_id == first.pipeline.version_id
    assert len(kfp.calls("POST", r"/pipelines/upload")) == 1
    assert len(kfp.experiments) == 1  # the experiment is reused too

    changed = tmp_path / "toy2.yaml"
    doc = yaml.safe_load(package.read_text())
    doc["pipelineInfo"]["description"] = "changed"
    changed.write_text(yaml.safe_dump(doc))
    third = submit(session, profile, "retrain", changed)
    assert third.pipeline.uploaded and third.pipeline.version_id != first.pipeline.version_id
    assert third.pipeline.version_name == f"flywheel-retrain-{third.pipeline.digest[:12]}"
    upload = kfp.calls("POST", r"/pipelines/upload_version$")[-1]
    assert upload.query["pipelineid"] == first.pipeline.pipeline_id
    assert f"sha256:{third.pipeline.digest}" in upload.query["description"]
    assert upload.body["uploadfile"] == changed.read_bytes()
    # and that version is reused on the next submit
    assert not submit(session, profile, "retrain", changed).pipeline.uploaded


def test_parameters_the_pipeline_does_not_declare_are_not_sent(kfp, session, profile, tmp_path):
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def noop(profile: dict):
        pass

    @dsl.pipeline(name="bare")
    def bare(profile: dict):
        noop(profile=profile)

    path = tmp_path / "bare.yaml"
    compiler.Compiler().compile(bare, str(path))
    run = submit(session, profile, "bare", path, data_location="/x")
    assert set(kfp.runs[run.run_id]["runtime_config"]["parameters"]) == {"profile"}


def test_every_request_carries_the_bearer_token(kfp, session, profile, package):
    submit(session, profile, "retrain", package)
    assert kfp.requests
    assert {r.headers.get("authorization") for r in kfp.requests} == {f"Bearer {TOKEN}"}


def test_wrong_token_is_one_readable_line_without_the_token(kfp):
    with pytest.raises(FlywheelError) as err:
        KfpSession(KfpTarget(kfp.url, token="wrong-token-123"))
    msg = str(err.value)
    assert "HTTP 401" in msg and "Unauthenticated" in msg
    assert "\n" not in msg and "wrong-token-123" not in msg


def test_wait_follows_the_run_to_success_and_fails_on_failure(contracts_dir, profile, package):
    with KfpStandIn(contracts_dir, run_states=("RUNNING", "RUNNING", "SUCCEEDED")) as kfp:
        s = KfpSession(KfpTarget(kfp.url))
        run = submit(s, profile, "retrain", package)
        seen: list[str] = []
        assert s.wait(run.run_id, timeout_s=10, poll_s=0.01, on_state=seen.append) == "SUCCEEDED"
        assert seen == ["RUNNING", "SUCCEEDED"]
    with KfpStandIn(contracts_dir, run_states=("RUNNING", "FAILED")) as kfp:
        s = KfpSession(KfpTarget(kfp.url))
        run = submit(s, profile, "retrain", package)
        with pytest.raises(FlywheelError, match=r"ended FAILED: task 'train' failed"):
            s.wait(run.run_id, timeout_s=10, poll_s=0.01)
    with KfpStandIn(contracts_dir, run_states=("RUNNING", "CANCELED")) as kfp:
        s = KfpSession(KfpTarget(kfp.url))
        run = submit(s, profile, "retrain", package)
        with pytest.raises(FlywheelError, match="ended CANCELED"):
            s.wait(run.run_id, timeout_s=10, poll_s=0.01)


def test_recurring_run_gets_converted_cron_one_at_a_time_and_no_catchup(
    kfp, session, profile, package
):
    rec = schedule(session, profile, "monitor", package, "0 3 * * *")
    body = kfp.recurring[rec.recurring_run_id]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["display_name"] == "flywheel-monitor"
    assert body["runtime_config"]["parameters"]["trigger_reason"] == "schedule"
    assert rec.cron == "0 0 3 * * *" and rec.status == "ENABLED"
    # the name must stay unique, so pause/resume/delete by name are unambiguous
    with pytest.raises(FlywheelError, match="exists"):
        schedule(session, profile, "monitor", package, "@daily")


def test_invalid_cron_fails_before_anything_is_sent(kfp, session, profile, package):
    before = len(kfp.requests)
    with pytest.raises(ConfigError, match="minute value 61"):
        schedule(session, profile, "monitor", package, "61 3 * * *")
    assert len(kfp.requests) == before


def test_pause_resume_delete_by_name_or_id(kfp, session, profile, package):
    rec = schedule(session, profile, "monitor", package, "*/30 * * * *", name="nightly")
    rid = rec.recurring_run_id
    assert session.pause("nightly") == rid
    assert kfp.recurring[rid]["status"] == "DISABLED"
    assert [r.status for r in session.list_recurring_runs()] == ["DISABLED"]
    assert session.resume(rid) == rid
    assert kfp.recurring[rid]["status"] == "ENABLED"
    assert kfp.calls("POST", rf"/recurringruns/{rid}:disable$")
    assert kfp.calls("POST", rf"/recurringruns/{rid}:enable$")
    session.delete("nightly")
    assert rid not in kfp.recurring and session.list_recurring_runs() == []
    with pytest.raises(FlywheelError, match="no recurring run named or with id 'nightly'"):
        session.pause("nightly")


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_server_errors_become_one_readable_line(kfp, session, profile, package, status):
    kfp.fail("POST", r"/runs$", status, f"backend said no ({status})")
    with pytest.raises(FlywheelError) as err:
        submit(session, profile, "retrain", package)
    msg = str(err.value)
    assert (
        f"HTTP {status}" in msg and f"backend said no ({status})" in msg and "creating a run" in msg
    )
    assert "\n" not in msg and TOKEN not in msg


def test_unreachable_host_is_one_line_and_fast(profile):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(
        FlywheelError, match=r"cannot reach Kubeflow Pipelines at .*: connection refused"
    ):
        KfpSession(KfpTarget(f"http://127.0.0.1:{port}"))
    assert time.monotonic() - start < 10  # not kfp's 5 x 5 s healthz retries


def test_healthz_5xx_fails_at_once(kfp):
    kfp.fail("GET", r"/healthz$", 503, "api server starting", times=10)
    with pytest.raises(FlywheelError, match=r"HTTP 503.*api server starting"):
        KfpSession(KfpTarget(kfp.url, token=TOKEN))
    assert len(kfp.calls("GET", r"/healthz$")) == 1


def test_multi_user_needs_a_namespace_and_sends_it(contracts_dir, profile, package):
    with KfpStandIn(contracts_dir, multi_user=True) as kfp:
        with pytest.raises(ConfigError, match="multi-user"):
            KfpSession(KfpTarget(kfp.url))
        s = KfpSession(KfpTarget(kfp.url, namespace="team-a"))
        run = submit(s, profile, "retrain", package)
        assert kfp.experiments[run.experiment_id]["namespace"] == "team-a"
        assert kfp.calls("POST", r"/pipelines/upload$")[0].query["namespace"] == "team-a"
        assert kfp.pipelines[run.pipeline.pipeline_id]["namespace"] == "team-a"
        assert kfp.violations == []


def _placeholder(value) -> bool:
    return isinstance(value, str) and value.startswith("{") and value.endswith("}")


def _same(planned, sent) -> bool:
    """A planned value against what went over the wire; `{...}` stands for a server id."""
    if _placeholder(planned):
        return isinstance(sent, str) and bool(sent)
    if isinstance(planned, dict) and set(planned) == {"file", "bytes", "sha256"}:
        import hashlib

        return (
            len(sent) == planned["bytes"] and hashlib.sha256(sent).hexdigest() == planned["sha256"]
        )
    if isinstance(planned, dict):
        return (
            isinstance(sent, dict)
            and set(planned) == set(sent)
            and all(_same(v, sent[k]) for k, v in planned.items())
        )
    if isinstance(planned, list):
        return (
            isinstance(sent, list)
            and len(planned) == len(sent)
            and all(_same(a, b) for a, b in zip(planned, sent, strict=True))
        )
    return planned == sent


def _assert_plan_was_sent(plan, sent) -> None:
    """The plan, less the steps an empty server does not need, is what kfp.Client sent."""
    assert len(plan) == len(sent), ([r.path for r in plan], [r.path for r in sent])
    for want, got in zip(plan, sent, strict=True):
        path = re.escape(want.path)
        path = re.sub(r"\\\{[a-z_]+\\\}", "[^/:]+", path)
        assert want.method == got.method and re.fullmatch(path, got.path), (want, got.path)
        query = {k: v for k, v in got.query.items() if v != ""}  # kfp sends empty page tokens
        assert _same(want.query, query), (want.path, want.query, query)
        assert _same(want.body, got.body), (want.path, want.body, got.body)


def _check_against_the_spec(contracts_dir, plan) -> None:
    """Every planned request is an operation of the v2beta1 spec with a valid query and body."""
    checker = ContractChecker(contracts_dir)
    for req in plan:
        op, _ = checker.match(req.method, req.path)
        checker.check_query(op, req.query)
        forms = {p["name"] for p in op.get("parameters", []) if p["in"] == "formData"}
        if forms:
            assert set(req.body) <= forms and "uploadfile" in req.body
        else:
            checker.check_body(op, req.body)


@pytest.mark.parametrize("namespace", [None, "team-a"])
def test_dry_run_plans_are_what_the_client_sends_and_follow_the_spec(
    contracts_dir, profile, package, namespace
):
    from flywheel.kfp.client import create_schedule, start_run
    from flywheel.kfp.plan import (
        plan_recurring_action,
        plan_schedule,
        plan_submit,
        schedule_spec,
        submit_spec,
    )

    p = load_profile(None, ["train.max_steps=7", "kfp.kubernetes.service_account=runner"])
    run = submit_spec(
        p, "retrain", package, trigger_reason="drift", data_location="/d", run_name="r1"
    )
    # Its own experiment, so that on this server too every conditional step applies.
    rec = schedule_spec(p, "monitor", package, "0 3 * * *", experiment="nightly")
    with KfpStandIn(contracts_dir, token=TOKEN, multi_user=bool(namespace)) as kfp:
        target = KfpTarget(kfp.url, token=TOKEN, namespace=namespace)
        plans = []
        for plan, act in [
            (plan_submit(run, namespace), lambda s: start_run(s, run)),
            (plan_schedule(rec, namespace), lambda s: create_schedule(s, rec)),
            (plan_recurring_action("pause", rec.name, namespace), lambda s: s.pause(rec.name)),
            (plan_recurring_action("resume", rec.name, namespace), lambda s: s.resume(rec.name)),
            (plan_recurring_action("delete", rec.name, namespace), lambda s: s.delete(rec.name)),
        ]:
            n = len(kfp.requests)
            act(KfpSession(target))
            # On a fresh server the pipeline is new: its versions are read, none uploaded.
            expected = [r for r in plan if not r.path.endswith("/upload_version")]
            _assert_plan_was_sent(expected, kfp.requests[n:])
            plans += plan
        assert kfp.violations == []
    _check_against_the_spec(contracts_dir, plans)
    upload_version = next(r for r in plans if r.path.endswith("/upload_version"))
    assert upload_version.when and upload_version.query["pipelineid"] == "{pipeline_id}"
    assert upload_version.query["name"] == run.upload.version_name


def test_the_plan_checker_can_fail(contracts_dir, profile, package):
    """A plan that breaks the spec, or differs from what was sent, is caught."""
    from dataclasses import replace

    from flywheel.kfp.plan import plan_submit, submit_spec

    plan = plan_submit(submit_spec(profile, "retrain", package), "ns")
    run = plan[-1]
    bad = replace(run, body={**run.body, "displayName": "camel"})
    with pytest.raises(HttpError, match="displayName"):
        _check_against_the_spec(contracts_dir, [bad])
    with pytest.raises(HttpError, match="not declared"):
        _check_against_the_spec(contracts_dir, [replace(plan[0], query={"bogus": "1"})])
    assert not _same(run.body, {**run.body, "display_name": "other"})
    assert not _same({"uploadfile": {"file": "a", "bytes": 1, "sha256": "0"}}, {"uploadfile": b"x"})


def test_cli_dry_run_prints_the_plan_as_json_and_connects_to_nothing(
    package, state_dir, capsys, monkeypatch
):
    import socket

    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    with socket.socket() as s:  # a port nothing listens on: connecting would fail loudly
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, out, err = _run_cli(
        [
            "submit",
            "retrain",
            *READY,
            "train.max_steps=7",
            "--host",
            host,
            "--package",
            str(package),
            "--dry-run",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dry_run"] is True and doc["host"] == host
    assert doc["authorization"] == "Bearer ***" and TOKEN not in out
    shown = [(r["method"], r["path"]) for r in doc["requests"]]
    assert ("POST", "/apis/v2beta1/pipelines/upload") in shown
    assert shown[-1] == ("POST", "/apis/v2beta1/runs")
    run_body = doc["requests"][-1]["body"]
    assert run_body["runtime_config"]["parameters"]["profile"]["train"]["max_steps"] == 7


def test_token_from_file_or_env_and_missing_file(tmp_path, monkeypatch):
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    t = resolve_target(KfpConfig(host="http://h:8888", token_file=str(file), namespace="ns"))
    assert t.token == TOKEN and t.namespace == "ns" and TOKEN not in repr(t)
    monkeypatch.setenv("MY_KFP_TOKEN", "from-env")
    assert resolve_target(KfpConfig(host="http://h", token_env="MY_KFP_TOKEN")).token == "from-env"
    with pytest.raises(ConfigError, match=r"kfp\.token_file"):
        resolve_target(KfpConfig(host="http://h", token_file=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="--host"):
        resolve_target(KfpConfig())
    assert resolve_target(KfpConfig(host="http://h"), host="http://other/").host == "http://other"


def test_the_standin_rejects_requests_that_break_the_spec(kfp):
    """The stand-in can fail: an unknown field, a missing required field, an undeclared query."""
    import urllib.error
    import urllib.request

    def post(path, body):
        req = urllib.request.Request(
            kfp.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        try:
            urllib.request.urlopen(req)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        return 200, None

    code, body = post("/apis/v2beta1/experiments", {"displayName": "x"})
    assert code == 400 and "displayName" in body["message"]
    code, body = post("/apis/v2beta1/recurringruns", {"display_name": "x", "trigger": {}})
    assert code == 400 and "max_concurrency" in body["message"]
    code, _ = post("/apis/v2beta1/experiments?bogus=1", {"display_name": "x"})
    assert code == 400
    assert len(kfp.violations) == 3
    kfp.violations.clear()


# ----------------------------------------------------------------------------- CLI


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_cli_submit_prints_the_run_url(kfp, package, state_dir, capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    try:
        main(
            [
                "submit",
                "retrain",
                *READY,
                "--host",
                kfp.url,
                "--package",
                str(package),
                "--wait",
                "--poll",
                "0.01",
            ]
        )
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code in (0, None), out.err
    (run_id,) = kfp.runs
    assert f"{kfp.url}/#/runs/details/{run_id}" in out.out
    assert "SUCCEEDED" in out.err


def test_cli_server_error_exits_1_with_one_line(kfp, package, state_dir, capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    kfp.fail("POST", r"/experiments$", 500, "database is locked")
    code, _, err = _cli(
        ["submit", "retrain", *READY, "--host", kfp.url, "--package", str(package)], capsys
    )
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "HTTP 500" in lines[0] and "database is locked" in lines[0]
    assert "Traceback" not in err


def test_cli_schedule_roundtrip_and_dry_run(kfp, package, state_dir, capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    common = ["--host", kfp.url]
    create = ["schedule", "create", "monitor", *READY, "--cron", "0 3 * * *"]
    main([*create, "--package", str(package), *common])
    assert "'0 0 3 * * *'" in capsys.readouterr().out
    main(["schedule", "list", *common])
    assert "flywheel-monitor" in capsys.readouterr().out
    main(["schedule", "pause", "flywheel-monitor", *common])
    main(["schedule", "resume", "flywheel-monitor", *common])
    capsys.readouterr()
    main(["schedule", "list", "--json", *common])
    (listed,) = json.loads(capsys.readouterr().out)["recurring_runs"]
    assert listed["name"] == "flywheel-monitor" and listed["cron"] == "0 0 3 * * *"
    assert listed["status"] == "ENABLED" and listed["max_concurrency"] == 1
    n = len(kfp.requests)
    main(["schedule", "delete", "flywheel-monitor", "--dry-run", *common])
    assert len(kfp.requests) == n and len(kfp.recurring) == 1
    plan = json.loads(capsys.readouterr().out)["requests"]
    assert plan[-1] == {
        "method": "DELETE",
        "path": "/apis/v2beta1/recurringruns/{recurring_run_id}",
    }
    assert "'flywheel-monitor'" in plan[-2]["when"]
    main(["schedule", "delete", "flywheel-monitor", *common])
    assert kfp.recurring == {}
    code, _, err = _cli(["schedule", "create", "monitor", "--cron", "0 3 * *", *common], capsys)
    assert code == 2 and "expected 5 fields" in err


def test_run_parameters_offer_only_what_the_pipeline_declares(profile):
    from flywheel.kfp.plan import run_parameters

    monitor = run_parameters({"profile": {}, "window": {}}, profile, "schedule", "/data/w")
    assert set(monitor) == {"profile", "window"} and monitor["window"] == "/data/w"
    retrain = run_parameters(
        {"profile": {}, "trigger_reason": {}, "data_location": {}}, profile, "drift: 0.9", None
    )
    assert set(retrain) == {"profile", "trigger_reason"}  # no location given: the default stands


# ---------------------------------------------------- issue 11: the cluster path


def _run_cli(args, capsys):
    """(exit code, stdout, stderr) of one CLI call, whether it exits or returns."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "host, ui_url, expected",
    [
        # a full Kubeflow deployment: API at <host>/pipeline, UI inside the central dashboard
        ("https://kf.example.com/pipeline", None, "https://kf.example.com/_/pipeline"),
        ("https://kf.example.com/pipeline/", None, "https://kf.example.com/_/pipeline"),
        # standalone KFP serves API and UI at one address
        ("http://127.0.0.1:8888", None, "http://127.0.0.1:8888"),
        (
            "https://kf.example.com/pipeline",
            "https://ui.example.com/kfp/",
            "https://ui.example.com/kfp",
        ),
    ],
)
def test_the_run_link_is_the_page_a_person_opens(host, ui_url, expected):
    from flywheel.kfp.client import ui_base

    assert ui_base(host, ui_url) == expected
    target = resolve_target(KfpConfig(host=host, ui_url=ui_url))
    assert target.run_url("r-1") == f"{expected}/#/runs/details/r-1"


def test_runs_and_recurring_runs_carry_the_profiles_service_account(kfp, session, package):
    p = load_profile(None, ["kfp.kubernetes.service_account=flywheel-runner"])
    run = submit(session, p, "retrain", package)
    assert kfp.runs[run.run_id]["service_account"] == "flywheel-runner"
    rec = schedule(session, p, "monitor", package, "0 3 * * *")
    assert kfp.recurring[rec.recurring_run_id]["service_account"] == "flywheel-runner"
    # unset: the field is left out and the namespace's default runner account applies
    run = submit(session, load_profile(None), "retrain", package)
    assert "service_account" not in kfp.runs[run.run_id]


def test_first_submit_names_the_uploaded_version_also_on_servers_without_version_names(
    contracts_dir, package, state_dir, capsys, monkeypatch
):
    """Servers before KFP 2.14 return a version's display_name but no `name`: the CLI used to
    print `version None uploaded`."""
    original = KfpStandIn._add_version

    def old_server(self, *args, **kwargs):
        version = original(self, *args, **kwargs)
        version.pop("name")
        return version

    monkeypatch.setattr(KfpStandIn, "_add_version", old_server)
    with KfpStandIn(contracts_dir) as kfp:
        code, out, err = _run_cli(
            ["submit", "retrain", *READY, "--host", kfp.url, "--package", str(package)], capsys
        )
        assert code == 0, err
        assert "None" not in err
        assert "uploaded version 'flywheel-retrain' (sha256:" in err
        assert f"{kfp.url}/#/runs/details/" in out
        code, _out, err = _run_cli(
            ["submit", "retrain", *READY, "--host", kfp.url, "--package", str(package)], capsys
        )
        assert code == 0 and "reused version 'flywheel-retrain'" in err
        assert len(kfp.calls("POST", r"/pipelines/upload")) == 1
        assert kfp.violations == []


def test_an_unchanged_pipeline_submitted_again_from_a_new_process_uploads_nothing(
    contracts_dir, tmp_path
):
    """Each `flywheel submit` compiles afresh in its own process (and hash seed): the same
    profile must give the same bytes, so the second submit reuses the version."""
    import os
    import subprocess

    from flywheel.config import CONFIG_DIR

    cluster = CONFIG_DIR / "cluster.yaml"
    with KfpStandIn(contracts_dir) as kfp:
        outputs = []
        for seed in ("1", "2"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            env.pop("KF_PIPELINES_TOKEN", None)
            proc = subprocess.run(
                [sys.executable, "-m", "flywheel.cli.main", "submit", "retrain",
                 "--profile", str(cluster), "--host", kfp.url],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            outputs.append(proc.stderr)
        assert "uploaded version" in outputs[0]
        assert "reused version" in outputs[1], outputs[1]
        assert len(kfp.calls("POST", r"/pipelines/upload")) == 1
        assert len(kfp.versions) == 1 and len(kfp.runs) == 2
        assert {r["service_account"] for r in kfp.runs.values()} == {"flywheel-runner"}
        assert kfp.violations == []


def test_package_that_is_not_a_pipeline_yaml_is_one_line_exit_2(tmp_path, state_dir, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    not_yaml = tmp_path / "notes.yaml"
    not_yaml.write_text("a: [unclosed\n")
    not_pipeline = tmp_path / "other.yaml"
    not_pipeline.write_text("name: just a mapping\n")
    for path, why in [
        (binary, "not UTF-8 text"),
        (not_yaml, "not a readable pipeline YAML"),
        (not_pipeline, "not a compiled pipeline"),
        (tmp_path / "absent.yaml", "file not found"),
    ]:
        # the host is never contacted: the package is read before connecting
        code, _, err = _run_cli(
            ["submit", "retrain", *READY, "--host", "http://127.0.0.1:9", "--package", str(path)],
            capsys,
        )
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert why in lines[0] and "Traceback" not in err and "UnicodeDecodeError" not in err


def test_a_call_the_server_never_answers_ends_in_one_line(kfp, monkeypatch):
    """Issue 24: an API that answers healthz and then stalls (a stuck ingress) hung submit and
    schedule list for good: kfp.Client sets no request timeout. Every call now has one."""
    import threading
    import time

    import flywheel.kfp.client as client_mod

    released = threading.Event()

    def stall(p, q, b):
        released.wait(10)
        return {}

    monkeypatch.setattr(kfp, "_op_RecurringRunService_ListRecurringRuns", stall)
    monkeypatch.setattr(client_mod, "CALL_TIMEOUT_S", 0.5)
    session = KfpSession(KfpTarget(kfp.url, token=TOKEN))
    start = time.monotonic()
    try:
        with pytest.raises(FlywheelError) as info:
            session.list_recurring_runs()
    finally:
        released.set()
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        f"Kubeflow Pipelines at {kfp.url}: listing recurring runs: no answer in 0.5 s"
    )
