"""One thin KFP lightweight component per stage.

Each function imports `flywheel` inside its body (KFP ships the function's source to
the container, not this module), turns artifacts into paths, calls one runner in
`flywheel.stages`, and writes outputs. `build(image)` wraps them with the project
image named in the profile, at compile time; nothing reads the environment.
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


def build(image: str) -> SimpleNamespace:
    """The components, each running in `image` (which has flywheel and kfp installed,
    hence `install_kfp_package=False`: no pip install at task start)."""
    return SimpleNamespace(
        **{
            name: dsl.component(func, base_image=image, install_kfp_package=False)
            for name, func in FUNCTIONS.items()
        }
    )
