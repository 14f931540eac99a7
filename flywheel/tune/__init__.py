"""Hyperparameter tuning: an Optuna study (TPE) of short Ray Train runs ranked on validation
loss, with Optuna's successive-halving (ASHA) pruner stopping weak trials early.

`tune(profile, dataset_dir, out_dir)` is the stage; `flywheel.tune.space` holds the pure
parts (search space, trial profile, schedule, storage), `flywheel.tune.trial` what each
trial runs, `flywheel.tune.report` the result and its HTML page.
"""

from flywheel.tune.report import TrialRecord, TuneResult
from flywheel.tune.study import tune

__all__ = ["TrialRecord", "TuneResult", "tune"]
