"""One thin KFP lightweight component per stage.

Each function imports `flywheel` inside its body (KFP ships the function's source to
the container, not this module), turns artifacts into paths, calls one runner in
`flywheel.stages`, and writes outputs. `build(kfp_config)` wraps each with the image the
profile names for its task (`KfpConfig.image_for`: `kfp.image`, or `kfp.control_image` for
the control tasks), at compile time; nothing reads the environment.
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components.drift_check import drift_check, no_retrain
from components.evaluate import evaluate, evaluate_champion
from components.gate import gate
from components.plan import plan, skip_tune
from components.prepare_data import prepare_data
from components.promote import promote
from components.summary import summary
from components.train import train
from components.tune import tune
from flywheel import contracts
from flywheel.config import KfpConfig

FUNCTIONS = {
    "plan": plan,
    "skip_tune": skip_tune,
    "prepare_data": prepare_data,
    "tune": tune,
    "train": train,
    "evaluate": evaluate,
    "evaluate_champion": evaluate_champion,
    "gate": gate,
    "promote": promote,
    "summary": summary,
    "drift_check": drift_check,
    "no_retrain": no_retrain,
}


# The task (flywheel.config.TASKS, the key of kfp.resources) each function runs as.
TASK_OF = {
    "plan": contracts.PLAN,
    "skip_tune": contracts.SKIP_TUNE,
    "prepare_data": contracts.PREPARE_DATA,
    "tune": contracts.TUNE,
    "train": contracts.TRAIN,
    "evaluate": contracts.EVALUATE,
    "evaluate_champion": contracts.EVALUATE_CHAMPION,
    "gate": contracts.GATE,
    "promote": contracts.PROMOTE,
    "summary": contracts.SUMMARY,
    "drift_check": contracts.DRIFT_CHECK,
    "no_retrain": contracts.NO_RETRAIN,
}


def build(kfp_config: KfpConfig) -> SimpleNamespace:
    """The components, each running in the image the profile names for its task (which has
    flywheel and kfp installed, hence `install_kfp_package=False`: no pip install at task
    start)."""
    return SimpleNamespace(
        **{
            name: dsl.component(
                func, base_image=kfp_config.image_for(TASK_OF[name]), install_kfp_package=False
            )
            for name, func in FUNCTIONS.items()
        }
    )
