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


def _plan_driven_by(profile, run_id: str, mark: str) -> None:
    ledger.record(profile, run_id, "plan", tags={ledger.DRIVER_TAG: mark})


def test_a_run_whose_local_driver_is_gone_is_not_in_flight(profile):
    """Issue 24: after Ctrl-C of `flywheel run` the plan entry without a summary blocked the
    monitor for STALE_RUN_S ("retrain already in flight: <dead run>"). A local run's plan
    names its driver process; a driver that is gone means the run is too."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_child = ledger.driver_mark(child.pid)
        _plan_driven_by(profile, "retrain-live", ledger.driver_mark())
        _plan_driven_by(profile, "retrain-child", live_child)
        assert monitor.retrains_in_flight(profile, "m", time.time()) == [
            "retrain-child",
            "retrain-live",
        ]
    finally:
        child.kill()
        child.wait()
    # the child (a driver interrupted) is gone: its run no longer blocks
    assert monitor.retrains_in_flight(profile, "m", time.time()) == ["retrain-live"]
    host, boot, pid, ticks = ledger.driver_mark().split("/")
    _plan_driven_by(profile, "retrain-before-reboot", f"{host}/not-{boot}/{pid}/{ticks}")
    # a driver on another machine cannot be checked from here: the age rule decides
    _plan_driven_by(profile, "retrain-elsewhere", f"other-{host}/{boot}/{pid}/{ticks}")
    assert monitor.retrains_in_flight(profile, "m", time.time()) == [
        "retrain-elsewhere",
        "retrain-live",
    ]


def test_the_local_driver_marks_what_it_starts_and_only_while_it_runs(monkeypatch):
    monkeypatch.delenv(ledger.DRIVER_ENV, raising=False)
    assert ledger.driver_tags() == {}
    with ledger.driving():
        assert ledger.driver_tags() == {ledger.DRIVER_TAG: ledger.driver_mark()}
        assert ledger.driver_alive(ledger.driver_tags()[ledger.DRIVER_TAG]) is True
    assert ledger.driver_tags() == {}


def test_the_plan_entry_names_the_driver_of_a_local_run(profile):
    from flywheel import stages

    with ledger.driving():
        stages.plan(profile.model_dump(), "retrain-x")
    stages.plan(profile.model_dump(), "retrain-on-kubeflow")  # no driver: a pod ran it
    tags = {
        run: ledger.collect(profile, run)["plan"]["tags"]
        for run in ("retrain-x", "retrain-on-kubeflow")
    }
    assert tags["retrain-x"][ledger.DRIVER_TAG] == ledger.driver_mark()
    assert ledger.DRIVER_TAG not in tags["retrain-on-kubeflow"]
