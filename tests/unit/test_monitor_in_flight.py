"""`retrains_in_flight`: which pipeline runs started (a `plan` entry) and have not finished
(no `summary`), read from a real MLflow store (SQLite in the state dir)."""

import pytest

from flywheel import ledger, monitor
from flywheel.config import load_profile

HOUR = 3600.0


@pytest.fixture
def profile(state_dir):
    return load_profile(None, [])


def _plan_at(profile, run_id: str, start_s: float) -> None:
    """A `plan` entry whose run started at `start_s` (ledger.record stamps the clock's now)."""
    import mlflow

    from flywheel.tracking import experiment_id, tracking_uri

    client = mlflow.MlflowClient(tracking_uri(profile))
    run = client.create_run(
        experiment_id(profile),
        start_time=int(start_s * 1000),
        tags={ledger.RUN_TAG: run_id, ledger.STAGE_TAG: "plan"},
    )
    client.set_terminated(run.info.run_id)


def test_started_runs_without_a_summary_are_in_flight(profile):
    import time

    now = time.time()
    assert monitor.retrains_in_flight(profile, exclude_run="monitor-1", now=now) == []
    ledger.record(profile, "retrain-a", "plan")  # running
    ledger.record(profile, "retrain-b", "plan")  # finished
    ledger.record(profile, "retrain-b", "summary", {}, {"state": "SUCCEEDED"})
    ledger.record(profile, "retrain-c", "plan")
    ledger.record(profile, "retrain-c", "summary", {}, {"state": "FAILED"})  # failed is done too
    ledger.record(profile, "monitor-1", "plan")  # the asking run itself never blocks
    _plan_at(profile, "retrain-dead", now - monitor.STALE_RUN_S - HOUR)  # evicted long ago
    _plan_at(profile, "retrain-slow", now - monitor.STALE_RUN_S + HOUR)  # long, still alive
    assert monitor.retrains_in_flight(profile, exclude_run="monitor-1", now=now) == [
        "retrain-a",
        "retrain-slow",
    ]
    # once the stale window passes the slow one, it no longer blocks either
    later = now + 2 * HOUR
    assert monitor.retrains_in_flight(profile, exclude_run="monitor-1", now=later) == ["retrain-a"]
