"""The registry against a real `mlflow server` on 127.0.0.1 (started here, stopped after),
and two real processes racing to promote, on the server and on the SQLite store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from fixtures_models import (
    fresh_model,
    promote_worker,
    save_model,
    split_paragraphs,
    train_tokenizer,
)
from fixtures_services import free_port, stop, wait_until_up
from fixtures_services import mlflow_server as start_mlflow_server

from flywheel.config import Profile
from flywheel.registry import LOCK_SUFFIX, HistoryEntry, Registry, lineage_tags

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A tracking server with its own SQLite backend and proxied artifact store."""
    with start_mlflow_server(tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two untrained tiny GPT-2s (different seeds): the registry does not care how good."""
    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(split_paragraphs()[0])
    return tuple(save_model(fresh_model(tok, seed=s), tok, root / f"m{s}") for s in (0, 1))


def _profile(state: Path, uri: str | None, name: str) -> Profile:
    registry = {"model_name": name, "retry_backoff_s": 0.05}
    if uri:
        registry["tracking_uri"] = uri
    return Profile(state_dir=str(state), registry=registry)


def test_lifecycle_through_a_tracking_server(mlflow_server, models, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = Registry(_profile(tmp_path / "state", mlflow_server, "server-lm"))
    first_dir, second_dir = models
    first = lineage_tags(data_hash="h1", training_run_id="t1", pipeline_run_id="p1")
    v1 = reg.register_candidate(first_dir, tags=first, model_card="# v1")
    v2 = reg.register_candidate(
        second_dir, tags=lineage_tags(data_hash="h1", trigger_reason="drift"), model_card="# v2"
    )
    assert (v1, v2) == ("1", "2")
    # A retried gate finds its version through the server's tag filter: no third version.
    assert reg.register_candidate(first_dir, tags=first, model_card="# v1") == "1"
    assert [v.version for v in reg.versions()] == ["1", "2"]
    assert reg.version("challenger").version == "1"
    info = reg.version("2")
    assert info.source.startswith("mlflow-artifacts:/")  # proxied through the server
    assert info.tags["flywheel.flavor"] == "pyfunc"
    reg.promote(v1, reason="bootstrap", actor="ci")
    reg.promote(v2, reason="won the gate", actor="ci")
    reg.rollback(reason="regression", actor="oncall")
    assert reg.champion().version == "1"
    assert [(h.kind, h.from_version, h.to_version) for h in reg.history()] == [
        ("promotion", None, "1"),
        ("promotion", "1", "2"),
        ("rollback", "2", "1"),
    ]
    # Downloaded through the server's artifact proxy into a from_pretrained directory.
    from transformers import AutoModelForCausalLM

    path = reg.download("2")
    assert AutoModelForCausalLM.from_pretrained(path).config.n_layer == 2
    # What `mlflow models serve -m models:/server-lm@champion` loads: the pyfunc flavour.
    import mlflow.pyfunc

    # `models:/` resolves against the process-wide URI, which an earlier test in the same
    # session may have set explicitly (and an explicit URI wins over the environment).
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        served = mlflow.pyfunc.load_model("models:/server-lm@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    out = served.predict({"prompt": ["The for statement"]}, params={"max_new_tokens": 3})
    assert out[0]["generated_tokens"] == 3 and isinstance(out[0]["text"], str)


def _invoke(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_mlflow_models_serve_honours_max_new_tokens(mlflow_server, models, tmp_path, monkeypatch):
    """The real `mlflow models serve -m models:/<name>@champion` (what a person runs): a
    request's max_new_tokens bounds the reply. Before the signature declared params, the
    server dropped them and every reply had the logged default length."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = Registry(_profile(tmp_path / "state", mlflow_server, "served-lm"))
    version = reg.register_candidate(models[0], tags=lineage_tags(data_hash="h"), model_card="#")
    reg.promote(version, reason="serve it", actor="ci")
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "models", "serve",
        "-m", "models:/served-lm@champion",
        "--env-manager", "local",
        "-h", "127.0.0.1",
        "-p", str(port),
        "-w", "1",
    ]  # fmt: skip
    # The server execs `uvicorn` by name: the venv's bin must be on PATH, as when activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_up(proc, f"{url}/ping", log_path, "mlflow models serve", timeout_s=120)
            replies = {
                n: _invoke(
                    url,
                    {
                        "dataframe_records": [{"prompt": "The for statement"}],
                        "params": {"max_new_tokens": n},
                    },
                )["predictions"][0]
                for n in (2, 10)
            }
        finally:
            stop(proc)
    counts = {n: reply["generated_tokens"] for n, reply in replies.items()}
    assert 1 <= counts[2] <= 2 and counts[2] < counts[10] <= 10, counts
    # The longer bound gave the longer text: the count describes the reply itself.
    assert replies[2]["text"] and len(replies[2]["text"]) < len(replies[10]["text"])


def _race(profile: Profile, versions: tuple[str, str]) -> list[tuple[str, str]]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=promote_worker,
            args=(profile.model_dump(), v, f"racer-{v}", barrier, results),
        )
        for v in versions
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_two_processes_promoting_at_once(store, request, models, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = request.getfixturevalue("mlflow_server") if store == "server" else None
    profile = _profile(tmp_path / "state", uri, f"race-{store}")
    reg = Registry(profile)
    for i in range(3):
        reg.register_candidate(models[0], tags=lineage_tags(data_hash="h"), model_card=f"# {i}")
    reg.promote("1", reason="start", actor="ci")

    results = _race(profile, ("2", "3"))
    errors = [r for _, r in results if r.startswith("ERROR")]
    assert not errors, errors
    history = reg.history()
    assert [h.seq for h in history] == [1, 2, 3]
    first, second = history[1], history[2]
    # Both moves recorded, in one consistent order: the second starts where the first ended.
    assert {first.to_version, second.to_version} == {"2", "3"}
    assert first.from_version == "1" and second.from_version == first.to_version
    assert reg.champion().version == second.to_version
    assert {e for _, e in results} == {first.to_tag(), second.to_tag()}
    assert HistoryEntry.model_validate_json(results[0][1]).actor.startswith("racer-")
    # Exactly one champion, and the lock is released.
    assert [v.version for v in reg.versions() if "champion" in v.aliases] == [second.to_version]
    names = [m.name for m in reg._client.search_registered_models()]
    assert f"race-{store}{LOCK_SUFFIX}" not in names
    assert json.loads(reg._client.get_registered_model(reg.name).tags["flywheel.history.00000003"])
