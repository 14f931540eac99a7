"""Issue 24, rule 6 (tracebacks and raw exception names): a bad URL, store or output path is
one line naming the flag or field, exit 2, before anything is sent or written.

Before: `--host 'http://exa mple.com'` (ProtocolError), `http://[::1` (LocationParseError),
`http://` (LocationValueError) failed at the first request with urllib3's class name;
`registry.tracking_uri=foo://x` with MLflow's UnsupportedModelRegistryStoreURIException;
`compile --out` onto a file with FileExistsError.
"""

from __future__ import annotations

import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.config import load_profile
from flywheel.errors import ConfigError
from flywheel.kfp.client import check_http_url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://exa mple.com", "a blank or control character in it"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://", "no host"),
        ("https://h:99999", "Port out of range 0-65535"),
        ("https://h:port", "Port could not be cast to integer value as 'port'"),
        ("ftp://h", "not http:// or https://"),
        ("kubeflow.example.com", "not http:// or https://"),
        ("http://h\n.example", "a blank or control character in it"),
    ],
)
def test_a_bad_kubeflow_url_names_the_flag(url, problem):
    with pytest.raises(ConfigError) as info:
        check_http_url(url, "--host")
    assert str(info.value) == (
        f"--host {url!r}: expected http(s)://HOST[:PORT][/PATH] ({problem})".replace("\n", "\\n")
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8888", "https://kubeflow.example.com/pipeline", "http://[::1]:80"]
)
def test_a_good_kubeflow_url_passes(url):
    check_http_url(url, "--host")


def test_a_bad_host_exits_2_before_any_request(tmp_path):
    out = flywheel(tmp_path, "schedule", "list", "--host", "http://exa mple.com", timeout=120)
    assert out.returncode == 2 and nonblank(out.stderr) == [
        "error: --host 'http://exa mple.com': expected http(s)://HOST[:PORT][/PATH] "
        "(a blank or control character in it)"
    ], out.stderr


@pytest.mark.parametrize("uri", ["foo://x", "s3://bucket/mlflow", "sqlite://"])
def test_an_unknown_tracking_store_fails_at_load(uri):
    with pytest.raises(ConfigError, match=r"registry\.tracking_uri: .*not an MLflow store"):
        load_profile(None, [f"registry.tracking_uri={uri}"])


@pytest.mark.parametrize(
    "uri",
    ["http://mlflow:5000", "postgresql+psycopg2://u@db/mlflow", "sqlite:////tmp/m.db", "./mlruns"],
)
def test_known_tracking_stores_load(uri):
    assert load_profile(None, [f"registry.tracking_uri={uri}"]).registry.tracking_uri == uri


def test_compile_onto_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    out = flywheel(tmp_path, "compile", "--out", "taken", timeout=120)
    assert out.returncode == 1 and nonblank(out.stderr) == [
        "error: --out taken: exists and is not a directory"
    ], out.stderr
    assert (tmp_path / "taken").read_text() == "x"
