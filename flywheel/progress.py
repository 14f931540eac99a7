"""Progress of the long stages (data, training, tuning) as typed events, one callback type.

The library calls `progress(event)` with one of the frozen dataclasses below; the CLI
draws its bars from them (`match event: case TrainStep(): ...`) and tests collect them
(`progress=events.append`). A field named here is a promise to every caller, so an event
carries only what some caller shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainPlanned:
    """The plan is made and checked; Ray and DeepSpeed start next."""

    workers: int
    global_batch: int
    tokens_per_step: int
    max_steps: int
    precision: str
    zero_stage: int
    model: str
    """Where the weights come from: the plan's model source kind (fresh, base, champion...)."""
    resume_step: int
    """0 for a fresh run; the checkpoint's step for a resumed one."""


@dataclass(frozen=True)
class TrainStarted:
    run_name: str
    mlflow_run_id: str


@dataclass(frozen=True)
class TrainStep:
    """One optimizer step of rank 0, relayed from the worker."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float


@dataclass(frozen=True)
class DataStepStarted:
    """A step of the data stage began (ray, read, dedup, near_dedup, split, tokenizer, ...)."""

    step: str


@dataclass(frozen=True)
class DataStepDone:
    step: str
    seconds: float
    counts: dict[str, Any]
    """The step's counts as the manifest records them (docs in/out, shards...)."""


@dataclass(frozen=True)
class StudyStarted:
    study: str
    first_trial: int
    n_trials: int
    parallel: int
    pruner: str
    storage: str
    """Password removed."""
    mlflow_run_id: str


@dataclass(frozen=True)
class TrialReported:
    """A trial's validation loss at one of the pruner's rungs."""

    trial: int
    step: int
    val_loss: float


@dataclass(frozen=True)
class TrialEnded:
    """Finished, pruned (error False) or failed (error True)."""

    trial: int
    error: bool


@dataclass(frozen=True)
class StageDone:
    """The stage's result metrics (TrainResult.metrics() / TuneResult.metrics())."""

    stage: str
    metrics: dict[str, float]


Event = (
    TrainPlanned
    | TrainStarted
    | TrainStep
    | DataStepStarted
    | DataStepDone
    | StudyStarted
    | TrialReported
    | TrialEnded
    | StageDone
)
Progress = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The callback when nobody watches."""
