"""The run ledger: `ledger.stage` times a block and records one entry, through a real
MLflow store in a temporary state directory."""

from __future__ import annotations

import time

import pytest

from flywheel import ledger
from flywheel.config import Profile


def test_stage_records_the_block_metrics_tags_and_its_duration(state_dir):
    profile = Profile()
    with ledger.stage(profile, "run-1", "train") as entry:
        time.sleep(0.05)
        entry.metrics["final_loss"] = 1.5
        entry.metrics["not_a_number"] = "x"  # dropped, as `record` drops it
        entry.tags["training_run_id"] = "abc"
    got = ledger.collect(profile, "run-1")["train"]
    assert got["metrics"]["final_loss"] == 1.5
    assert "not_a_number" not in got["metrics"]
    assert 0.05 <= got["metrics"]["stage_seconds"] < 5
    assert got["tags"]["training_run_id"] == "abc"
    assert got["tags"][ledger.RUN_TAG] == "run-1"
    assert got["tags"][ledger.STAGE_TAG] == "train"


def test_an_untimed_stage_records_no_duration(state_dir):
    profile = Profile()
    with ledger.stage(profile, "run-1", "plan", timed=False) as entry:
        entry.tags["tune_enabled"] = False
    got = ledger.collect(profile, "run-1")["plan"]
    assert got["metrics"] == {}
    assert got["tags"]["tune_enabled"] == "False"


def test_a_stage_that_raises_records_nothing(state_dir):
    profile = Profile()
    with pytest.raises(RuntimeError), ledger.stage(profile, "run-1", "gate") as entry:
        entry.metrics["x"] = 1.0
        raise RuntimeError("boom")
    with ledger.stage(profile, "run-1", "plan", timed=False):
        pass
    assert set(ledger.collect(profile, "run-1")) == {"plan"}
