"""The whole retraining DAG through kfp.local, on a tiny profile, several runs in order.

1. first run: no champion -> the candidate meets the absolute bounds -> promoted, with lineage
2. second run: warm-starts from the champion and is gated against it (fresh evaluation of both)
3. sabotaged challenger (a fresh model trained for one step): not promoted, run still succeeds
4. a failing step: the run fails, and the exit handler's summary is still written
"""

from __future__ import annotations

import json

import pytest
from fixtures_data import TINY_OVERRIDES

from flywheel import ledger
from flywheel.config import load_profile
from flywheel.kfp.local import run_local
from flywheel.registry import Registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def profile_for(workdir):
    overrides = [f"state_dir={workdir / '.flywheel'}", *TINY_OVERRIDES, "tune.enabled=false"]

    def make(*extra: str):
        return load_profile(None, overrides + list(extra))

    return make


def _version(registry: Registry, number: str):
    return next(v for v in registry.versions() if str(v.version) == str(number))


def test_first_run_promotes_with_lineage(profile_for):
    p = profile_for()
    run = run_local("retrain", p, arguments={"trigger_reason": "first"})
    assert run.succeeded, run.log_file.read_text()[-3000:]
    registry = Registry(p)
    champ = registry.champion()
    assert champ is not None
    for tag in (
        "data_manifest_hash",
        "training_run_id",
        "pipeline_run_id",
        "trigger_reason",
        "verdict",
    ):
        assert champ.tags.get(tag), f"champion lacks lineage tag {tag}: {champ.tags}"
    assert champ.tags["pipeline_run_id"] == run.run_id
    assert champ.tags["trigger_reason"] == "first"
    # what a person inspects in the UI exists as typed artifacts
    assert (
        run.artifact("train", "loss_curve")
        .read_text()
        .lstrip()
        .lower()
        .startswith(("<!doctype", "<html"))
    )
    assert "promote" in run.artifact("gate", "decision").read_text().lower()
    assert "State:** SUCCEEDED" in run.artifact("summary", "report").read_text()
    stages = ledger.collect(p, run.run_id)
    assert {"plan", "prepare-data", "train", "gate", "promote", "summary"} <= set(stages)


def test_second_run_warm_starts_and_is_gated_against_champion(profile_for):
    p = profile_for()
    before = Registry(p).champion().version
    run = run_local("retrain", p, arguments={"trigger_reason": "second"})
    assert run.succeeded, run.log_file.read_text()[-3000:]
    stages = ledger.collect(p, run.run_id)
    gate = stages["gate"]
    assert "champion_perplexity" in gate["metrics"], "the champion was not evaluated"
    assert "challenger_perplexity" in gate["metrics"]
    import mlflow

    from flywheel.tracking import tracking_uri

    # The profile's store, named: nothing sets a process-wide tracking URI any more.
    client = mlflow.MlflowClient(tracking_uri(p))
    train_run = client.get_run(stages["train"]["tags"]["training_run_id"])
    assert train_run.data.tags["flywheel.warm_start"] == "True"
    # the data stage tokenized with the champion's tokenizer, so the warm start reads the same ids
    assert "flywheel.tokenizer_mismatch" not in train_run.data.tags
    version = _version(Registry(p), gate["tags"]["version"])
    assert version.tags["trigger_reason"] == "second"
    assert int(version.version) > int(before)


def test_sabotaged_challenger_is_gated_and_run_succeeds(profile_for):
    p = profile_for(
        "model.warm_start=false", "train.max_steps=1", "train.warmup_steps=0", "train.lr=0"
    )
    registry = Registry(p)
    before = registry.champion().version
    run = run_local("retrain", p, arguments={"trigger_reason": "sabotage"})
    assert run.succeeded, run.log_file.read_text()[-3000:]
    gate = ledger.collect(p, run.run_id)["gate"]
    assert gate["tags"]["promote"] == "False"
    assert registry.champion().version == before
    assert run.artifact("promote", "executor_output.json") is None  # the promote task never ran
    assert "reject" in run.artifact("gate", "decision").read_text().lower()


def test_failing_step_still_writes_the_summary(profile_for, workdir):
    p = profile_for()
    run = run_local("retrain", p, arguments={"data_location": str(workdir / "no-such-dir")})
    assert not run.succeeded
    summary = run.artifact("summary", "report")
    assert summary is not None, "the exit handler did not run"
    assert "FAILED" in summary.read_text()
    assert json.loads((run.run_dir / "summary" / "executor_output.json").read_text()) is not None
