"""Tuning's pure parts (space, trial profile, schedule, storage), the searcher's bookkeeping
on a real Optuna study, the result and its HTML page. No Ray cluster, no training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from flywheel.config import load_profile
from flywheel.errors import ConfigError, FlywheelError
from flywheel.tune import TrialRecord, TuneResult
from flywheel.tune import space as S

SMALL = ["data.block_size=32", "model.context=32", "train.micro_batch_size=4"]


@pytest.fixture
def profile(state_dir):
    return load_profile(None, SMALL)


# ------------------------------------------------------------------------- space


def test_distributions_of_each_kind():
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    d = S.distributions(
        {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "warmup_steps": {"type": "int", "low": 0, "high": 10, "step": 2},
            "lr_schedule": {"type": "categorical", "choices": ["cosine", "constant"]},
        }
    )
    assert d["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["warmup_steps"] == IntDistribution(0, 10, step=2)
    assert d["lr_schedule"] == CategoricalDistribution(["cosine", "constant"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "float", "low": 1e-2, "high": 1e-4}, "tune.search_space.lr:"),
        ({"type": "float", "low": 0.0, "high": 1e-2, "log": True}, "tune.search_space.lr:"),
        ({"type": "float", "low": 1e-4, "high": 1e-2, "scale": 2}, "unknown key(s) ['scale']"),
    ],
)
def test_bad_distributions_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        S.distributions({"lr": spec})


def test_space_bounds_that_make_a_bad_training_profile_fail_before_any_trial(profile):
    # Checked when the profile loads (a pipeline's tune step starts after the data stage).
    with pytest.raises(
        ConfigError, match=r"tune\.search_space\.lr: -1\.0 is not a valid train\.lr"
    ):
        load_profile(
            None, [*SMALL, "tune.search_space={lr: {type: float, low: -1.0, high: 1.0e-2}}"]
        )
    assert set(S.check_space(profile)) == {"lr", "warmup_steps"}


def test_profile_rejects_a_space_over_a_non_train_field(state_dir):
    with pytest.raises(ConfigError, match=r"tune\.search_space\.scaling: not a train field"):
        load_profile(None, ["tune.search_space={scaling: {type: int, low: 1, high: 2}}"])


def test_trial_profile_is_a_short_single_worker_run_of_the_sampled_values(profile, state_dir):
    p = S.trial_profile(profile, {"lr": 0.004, "warmup_steps": 5})
    t = p.train
    assert (t.lr, t.max_steps, t.scaling.num_workers) == (0.004, profile.tune.trial_steps, 1)
    # The default trial is 8 steps: warmup 5 fits; one checkpoint, at the end (losses reach
    # the study through validation reports); MLflow flushes at the rung spacing, 2.
    assert t.warmup_steps == 5 and t.checkpoint_every == 8 and t.log_every == 2
    assert t.max_failures == 0 and t.resume_from is None and t.global_batch_size is None
    assert Path(p.state_dir).is_absolute() and Path(p.state_dir) == state_dir
    # Everything else is the profile's own.
    assert p.model == profile.model and t.micro_batch_size == profile.train.micro_batch_size


def test_trial_profile_clamps_warmup_to_the_trial_and_drops_a_global_batch(state_dir):
    prof = load_profile(None, [*SMALL, "tune.trial_steps=3", "train.global_batch_size=8"])
    p = S.trial_profile(prof, {"warmup_steps": 5})
    assert p.train.warmup_steps == 3 and p.train.max_steps == 3
    assert p.train.effective_global_batch == 4  # one worker: micro x accum


@pytest.mark.parametrize(("steps", "grace"), [(1, 1), (3, 1), (8, 2), (10, 2), (100, 25)])
def test_asha_schedule(steps, grace):
    assert S.asha_schedule(steps) == (grace, 2)


def test_storage_is_sqlite_under_the_state_dir_unless_the_profile_names_one(profile, state_dir):
    assert S.storage_url(profile) == f"sqlite:///{state_dir / 'optuna' / 'optuna.db'}"
    pg = load_profile(None, ["tune.storage=postgresql://tuner:s3cret@db:5432/optuna"])
    assert S.storage_url(pg) == "postgresql://tuner:s3cret@db:5432/optuna"
    assert S.masked(S.storage_url(pg)) == "postgresql://tuner:***@db:5432/optuna"


def test_plain_values_are_json_types():
    import numpy as np

    out = [S.plain(np.float64(0.5)), S.plain(np.int64(3)), S.plain(1.0), S.plain("cosine")]
    assert out == [0.5, 3, 1.0, "cosine"]
    assert [type(v) for v in out] == [float, int, float, str]


# --------------------------------------------------------------------- searcher


def test_trials_are_recorded_complete_pruned_and_failed_in_optuna_terms(tmp_path):
    """The study driver (ask under a lock, tell by outcome) on a real Optuna study: what
    each trial does is given here, as the Ray Train run would end."""
    import optuna
    from optuna.trial import TrialState

    from flywheel.tune.study import run_trials
    from flywheel.tune.trial import TrialPruned

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="unit")
    space = S.distributions({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})

    def one(trial):
        trial.report(6.0, 2)
        if trial.number == 1:
            raise TrialPruned(2)
        if trial.number == 2:
            raise RuntimeError("worker died\nsecond line")
        if trial.number == 3:
            return float("nan"), 8
        trial.report(5.0, 8)
        return 5.0, 8

    ran = run_trials(study, space, n_trials=4, parallel=2, one_trial=one)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.FAIL,
    ]
    assert trials[0].value == 5.0 and trials[0].intermediate_values == {2: 6.0, 8: 5.0}
    assert ran["steps"] == {0: 8, 1: 2, 3: 8}
    assert ran["errors"][2] == "RuntimeError: worker died" and "nan" in ran["errors"][3]


def test_successive_halving_prunes_a_trial_worse_than_its_rung():
    """tune.pruner=asha is Optuna's successive halving on the reported validation losses."""
    import optuna

    from flywheel.tune.study import _pruner

    prof = load_profile(None, [*SMALL, "tune.trial_steps=8"])
    study = optuna.create_study(pruner=_pruner(prof.tune))
    good = study.ask()
    good.report(5.0, 2)
    assert not good.should_prune()
    study.tell(good, 5.0)
    bad = study.ask()
    bad.report(6.0, 2)
    assert bad.should_prune()
    none = load_profile(None, [*SMALL, "tune.pruner=none"])
    assert isinstance(_pruner(none.tune), optuna.pruners.NopPruner)


@pytest.mark.parametrize(
    ("steps", "expected"), [(1, [1]), (4, [1, 2, 4]), (8, [2, 4, 8]), (10, [2, 4, 8, 10])]
)
def test_trials_report_validation_loss_at_each_rung_and_the_last_step(steps, expected):
    from flywheel.tune.trial import report_steps

    assert report_steps(steps, *S.asha_schedule(steps)) == expected


def test_the_validation_slice_is_fixed_and_a_dataset_without_one_fails(tmp_path):
    import shutil

    from fixtures_data import build_dataset

    from flywheel.errors import DataError
    from flywheel.tune.trial import validation_slice

    ds = build_dataset(tmp_path / "ds", block_size=32, vocab_size=512)
    first, again = validation_slice(ds, 4), validation_slice(ds, 4)
    assert first == again and len(first) == 4 and all(len(b) == 32 for b in first)
    shutil.rmtree(ds / "validation")
    with pytest.raises(DataError, match="no validation blocks"):
        validation_slice(ds)


# ----------------------------------------------------------------------- result


def _result(trials: list[TrialRecord], importances: dict[str, float]) -> TuneResult:
    return TuneResult(
        best_params={"lr": 0.003, "warmup_steps": 2},
        best_value=5.1,
        best_trial=0,
        trials_complete=sum(t.state == "COMPLETE" for t in trials),
        trials_pruned=sum(t.state == "PRUNED" for t in trials),
        trials_failed=sum(t.state == "FAIL" for t in trials),
        trial_steps_spent=sum(t.steps for t in trials),
        trial_steps_budget=8 * len(trials),
        study_name="s",
        storage="sqlite:///x.db",
        study_trials=len(trials),
        first_trial=0,
        pruner="asha",
        trial_steps=8,
        trials=trials,
        importances=importances,
        errors={2: "DataError: too small"},
    )


TRIALS = [
    TrialRecord(
        number=0,
        state="COMPLETE",
        value=5.1,
        params={"lr": 0.003, "warmup_steps": 2},
        intermediate={2: 6.0, 4: 5.6, 8: 5.1},
        steps=8,
    ),
    TrialRecord(
        number=1,
        state="PRUNED",
        params={"lr": 0.0001, "warmup_steps": 0},
        intermediate={2: 6.2},
        steps=2,
    ),
    TrialRecord(number=2, state="FAIL", params={"lr": 0.001, "warmup_steps": 1}),
]


def test_metrics_are_floats_and_best_params_are_json():
    r = _result(TRIALS, {})
    m = r.metrics()
    assert m["trials_complete"] == 1 and m["trials_pruned"] == 1 and m["trials_failed"] == 1
    assert m["trial_steps_spent"] == 10 and m["trial_steps_budget"] == 24
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert json.loads(json.dumps(r.best_params)) == r.best_params


def test_html_is_one_self_contained_page(tmp_path):
    page = _result(TRIALS, {"lr": 0.8, "warmup_steps": 0.2}).write_html(tmp_path / "p.html")
    text = page.read_text()
    assert list(tmp_path.iterdir()) == [page]
    # XML namespace names (svg, xlink) are identifiers, never fetched; any other URL would be.
    assert "<script" not in text and "http" not in re.sub(r'xmlns(:\w+)?="[^"]*"', "", text)
    assert text.count("<svg") == 3  # history, per-step losses, importances
    assert "Optimization history" in text and "Parameter importances" in text
    assert "DataError: too small" in text and len(text) < 50_000


def test_html_without_importances_says_why(tmp_path):
    text = _result(TRIALS, {}).write_html(tmp_path / "p.html").read_text()
    assert text.count("<svg") == 2
    assert "Not estimated: needs at least 2 finished trials" in text


# ------------------------------------------------------------- into the training


def test_best_params_merge_into_the_training_config(profile):
    from flywheel.profiles import with_params

    merged = with_params(profile, _result(TRIALS, {}).best_params)
    assert merged.train.lr == 0.003 and merged.train.warmup_steps == 2
    assert merged.train.max_steps == profile.train.max_steps  # not the trial's budget


def test_a_dataset_too_small_fails_before_ray_starts(state_dir, tmp_path):
    import ray
    from fixtures_data import build_dataset

    from flywheel.tune import tune

    ds = build_dataset(tmp_path / "ds", block_size=32, vocab_size=300, max_train_blocks=2)
    with pytest.raises(FlywheelError, match="fewer than one global batch"):
        tune(load_profile(None, SMALL), ds, tmp_path / "out")
    assert not ray.is_initialized()


def test_an_unreachable_storage_fails_with_the_field_and_no_password(state_dir, tmp_path):
    from fixtures_data import build_dataset

    from flywheel.tune import tune

    ds = build_dataset(tmp_path / "ds", block_size=32, vocab_size=300)
    bad = load_profile(None, [*SMALL, "tune.storage=sqlite:////nonexistent-dir/x/optuna.db"])
    with pytest.raises(FlywheelError, match=r"^tune\.storage: cannot open study 'flywheel' at"):
        tune(bad, ds, tmp_path / "out")
    pg = load_profile(None, [*SMALL, "tune.storage=postgresql://u:s3cret@127.0.0.1:1/optuna"])
    with pytest.raises(FlywheelError) as info:
        tune(pg, ds, tmp_path / "out")
    assert "s3cret" not in str(info.value) and "u:***@127.0.0.1:1" in str(info.value)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["tune.nope=1"], 2, "tune.nope: unknown field"),
        (["tune.search_space={lr: {type: float, low: 1.0, high: 0.1}}"], 2, "tune.search_space.lr"),
        ([], 2, "'/nonexistent-dataset' does not exist"),
    ],
)
def test_cli_errors_are_one_line_before_any_work(args, code, message, state_dir):
    from fixtures_cli import flywheel, nonblank

    out = flywheel(None, "tune", "--data", "/nonexistent-dataset", *args, timeout=120)
    lines = nonblank(out.stderr)
    assert out.returncode == code and len(lines) == 1, out.stderr
    assert message in lines[0] and "Traceback" not in out.stderr
