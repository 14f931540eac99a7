"""Tuning end to end: Optuna (ask/tell, successive-halving pruner) driving real Ray Train
trials (DeepSpeed on gloo) ranked on validation loss, Optuna on SQLite, MLflow on SQLite.
One local Ray for the module; tiny GPT-2, 4-step trials (validation reports at 1, 2, 4).

A failing trial is injected through the search space itself: a micro batch of 100,000
blocks is a valid profile but larger than the dataset, so that trial's training plan raises
the training stage's own DataError, as any trial with an impossible setting would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fixtures_data import build_dataset

from flywheel.config import load_profile
from flywheel.errors import FlywheelError
from flywheel.progress import Event, StageDone, StudyStarted, TrialEnded

pytestmark = pytest.mark.integration

SPACE = (
    "tune.search_space={lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}, "
    "micro_batch_size: {type: categorical, choices: [4, 100000]}}"
)
TINY = [
    "data.block_size=32",
    "model.context=32",
    "model.n_embd=32",
    "train.micro_batch_size=4",
    "train.warmup_steps=1",
    "train.max_steps=6",
    "train.checkpoint_every=6",
    "tune.trial_steps=4",
    "tune.parallel=2",
    # Pinned: with this seed the first three draws are micro batch 4, 100000, 4 (two runs
    # that train and one that fails), so the study shows every outcome in one small run.
    "tune.seed=3",
]


@pytest.fixture(scope="module")
def workdir(ray_workdir):
    return ray_workdir


@pytest.fixture(scope="module")
def dataset(workdir) -> Path:
    return build_dataset(workdir / "ds", block_size=32, vocab_size=512)


@pytest.fixture(scope="module")
def study(workdir, dataset):
    from flywheel.tune import tune

    profile = load_profile(None, [*TINY, SPACE, "tune.n_trials=3", "tune.study_name=s"])
    events: list[Event] = []
    result = tune(
        profile,
        dataset,
        workdir / "out",
        tags={"trigger_reason": "test"},
        progress=events.append,
    )
    return profile, result, events


def _mlflow(profile):
    from mlflow import MlflowClient

    from flywheel import tracking

    return MlflowClient(tracking.tracking_uri(profile))


def test_study_completes_with_a_failed_trial_recorded_and_the_rest_run(study, workdir):
    import ray

    _, r, events = study
    states = [t.state for t in r.trials]
    assert len(states) == 3 and r.first_trial == 0 and r.study_trials == 3
    assert states[1] == "FAIL" and "FAIL" not in (states[0], states[2]), states
    assert r.trials_failed == 1 and r.trials_complete >= 1
    assert r.trials_complete + r.trials_pruned + r.trials_failed == 3
    assert "DataError" in r.errors[1] and "fewer than one global batch" in r.errors[1]
    # Steps actually run: trials that trained ran 4 steps or stopped at a rung.
    ran = [t for t in r.trials if t.state != "FAIL"]
    assert r.trial_steps_spent == sum(t.steps for t in ran) and 2 <= r.trial_steps_spent <= 8
    best = next(t for t in r.trials if t.number == r.best_trial)
    assert best.state == "COMPLETE" and best.value == r.best_value
    # Validation loss: a fresh model starts near ln(512) = 6.24 and 4 steps move it a little.
    assert 5.0 < r.best_value < math.log(512) + 0.2, r.best_value
    assert best.intermediate[4] == r.best_value and sorted(best.intermediate) == [1, 2, 4]
    assert r.best_params["micro_batch_size"] == 4 and 1e-3 <= r.best_params["lr"] <= 1e-2
    assert json.loads((workdir / "out" / "best_params.json").read_text()) == r.best_params
    assert r.storage == f"sqlite:///{workdir / '.flywheel' / 'optuna' / 'optuna.db'}"
    kinds = [type(e) for e in events]
    assert kinds[0] is StudyStarted and kinds[-1] is StageDone and kinds.count(TrialEnded) == 3
    # A stopped or finished trial gives its CPUs back (no placement group left behind).
    live = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert not live, live


def test_each_trial_is_a_nested_mlflow_run_under_the_tuning_run(study):
    profile, r, _ = study
    client = _mlflow(profile)
    parent = client.get_run(r.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["flywheel.stage"] == "tune"
    assert parent.data.metrics["trials_failed"] == 1
    assert parent.data.params["best.lr"] == str(r.best_params["lr"])
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{r.mlflow_run_id}'",
    )
    by_trial = {int(x.data.tags["flywheel.tune_trial"]): x for x in runs}
    assert sorted(by_trial) == [0, 1, 2]
    failed = by_trial[1]
    assert failed.info.status == "FAILED" and failed.data.tags["flywheel.tune_state"] == "FAIL"
    assert "fewer than one global batch" in failed.data.tags["flywheel.error"]
    best = by_trial[r.best_trial]
    assert best.info.status == "FINISHED" and best.data.tags["flywheel.tune_state"] == "COMPLETE"
    assert best.data.metrics["final_loss"] == pytest.approx(r.best_value)
    assert best.data.params["train.lr"] == str(r.best_params["lr"])
    # Rank 0's per-step losses land in the trial's run, as in a training run, and the
    # validation losses the study ranked it on, at each report.
    history = client.get_metric_history(best.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    val = client.get_metric_history(best.info.run_id, "val_loss")
    record = next(t for t in r.trials if t.number == r.best_trial)
    assert {m.step: m.value for m in val} == pytest.approx(record.intermediate)


def test_rerun_with_the_same_study_name_continues_the_trial_count(study, dataset, workdir):
    from flywheel.tune import tune

    profile = load_profile(
        None, [*TINY, SPACE, "tune.n_trials=1", "tune.study_name=s", "tune.pruner=none"]
    )
    r = tune(profile, dataset, workdir / "out2")
    assert r.first_trial == 3 and [t.number for t in r.trials if t.this_run] == [3]
    assert r.study_trials == 4 and len(r.trials) == 4
    # The best is over the whole study, earlier runs included.
    assert r.best_value == min(t.value for t in r.trials if t.state == "COMPLETE")


def test_a_study_where_every_trial_fails_fails_with_the_first_error(workdir, dataset):
    from flywheel.tune import tune

    profile = load_profile(
        None,
        [
            *TINY,
            "tune.search_space={micro_batch_size: {type: categorical, choices: [100000]}}",
            "tune.n_trials=2",
            "tune.study_name=broken",
        ],
    )
    with pytest.raises(FlywheelError) as info:
        tune(profile, dataset, workdir / "out3")
    msg = str(info.value)
    assert msg.startswith("tuning: all 2 trials of study 'broken' failed; the first: DataError:")
    assert "fewer than one global batch" in msg and "Traceback" not in msg


@pytest.fixture(scope="module")
def trained(study, dataset, workdir):
    from flywheel.profiles import with_params
    from flywheel.train import train

    _, r, _ = study
    tuned = with_params(load_profile(None, TINY), r.best_params)
    return train(tuned, dataset, workdir / "model")


def test_best_params_reach_the_training_run(study, trained):
    profile, r, _ = study
    result = trained
    params = _mlflow(profile).get_run(result.mlflow_run_id).data.params
    assert params["train.lr"] == str(r.best_params["lr"])
    assert params["train.micro_batch_size"] == "4" and params["train.max_steps"] == "6"
    assert result.steps == 6 and result.final_loss < result.first_loss


def test_trials_start_from_the_model_the_train_step_starts_from(study, trained, dataset, workdir):
    """A warm-started retrain trains from the champion, so its trials do too: their first
    validation loss is the trained model's, not a fresh model's ~ln(512)."""
    from flywheel.tune import tune

    profile, fresh, _ = study
    space = "tune.search_space={lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}"
    args = [*TINY, space, "tune.n_trials=1", "tune.study_name=warm", "tune.pruner=none"]
    warm = tune(load_profile(None, args), dataset, workdir / "warm", init_from=trained.model_dir)
    first_fresh = min(t.intermediate[1] for t in fresh.trials if t.state != "FAIL")
    (trial,) = warm.trials
    assert trial.state == "COMPLETE" and sorted(trial.intermediate) == [1, 2, 4]
    assert trial.intermediate[1] < first_fresh - 0.05, (trial.intermediate, first_fresh)
    run = _mlflow(profile).get_run(warm.mlflow_run_id)
    assert run.data.params["tune.init_from"] == trained.model_dir


def test_a_study_on_postgresql_continues_across_runs_and_never_shows_the_password(
    workdir, dataset, monkeypatch
):
    """tune.storage on a real PostgreSQL server (Debian's package, started here), as a cluster
    profile names it: the URL carries no password; libpq reads $PGPASSWORD, which a
    Kubernetes Secret fills in a pod."""
    import optuna
    from fixtures_services import postgres_server

    from flywheel.tune import tune

    space = "tune.search_space={lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}"
    with postgres_server() as pg:
        monkeypatch.setenv("PGPASSWORD", pg.password)
        args = [*TINY, space, f"tune.storage={pg.url()}", "tune.study_name=pg", "tune.pruner=none"]
        first = tune(load_profile(None, [*args, "tune.n_trials=2"]), dataset, workdir / "pg1")
        again = tune(load_profile(None, [*args, "tune.n_trials=1"]), dataset, workdir / "pg2")
        stored = optuna.load_study(study_name="pg", storage=pg.url())
        assert [t.state.name for t in stored.trials] == ["COMPLETE"] * 3
        assert first.study_trials == 2 and again.first_trial == 2 and again.study_trials == 3
        assert again.best_value == min(t.value for t in stored.trials)
        assert pg.password not in again.storage and again.storage.startswith("postgresql")
        # Without the secret the database refuses, and the stage says which field and server.
        monkeypatch.setenv("PGPASSWORD", "wrong")
        with pytest.raises(FlywheelError, match=r"tune\.storage"):
            tune(load_profile(None, [*args, "tune.n_trials=1"]), dataset, workdir / "pg3")
