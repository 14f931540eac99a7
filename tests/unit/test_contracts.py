"""Names shared across modules agree with the layouts and lists they stand for."""

from __future__ import annotations

from pathlib import Path

from flywheel import artifacts, contracts
from flywheel.config import TASKS


def test_the_monitor_downloads_the_samples_where_the_train_step_logs_them():
    # tracking.log_dataset_samples logs each text file under SAMPLES_DIR by its own name.
    ref, heldout = Path(artifacts.REFERENCE_TEXT).name, Path(artifacts.TEST_TEXT).name
    assert f"{contracts.SAMPLES_DIR}/{ref}" == contracts.REFERENCE_SAMPLE
    assert f"{contracts.SAMPLES_DIR}/{heldout}" == contracts.HELDOUT_SAMPLE


def test_every_task_of_the_profile_is_a_named_stage():
    named = {v for k, v in vars(contracts).items() if k.isupper() and isinstance(v, str)}
    assert set(TASKS) <= named
    # The ledger's stages are the tasks, less the one that records nothing, plus the
    # challenger's entry (its task is `evaluate`).
    ledger_stages = set(TASKS) - {contracts.SKIP_TUNE, contracts.EVALUATE}
    assert contracts.EVALUATE_CHALLENGER not in TASKS
    assert {contracts.PLAN, contracts.SUMMARY, contracts.DRIFT_CHECK} <= ledger_stages
