"""The monitor's decision: retrain now, or not, and why.

`decide_retrain` is pure and tested case by case. Its inputs are gathered by thin
adapters: the drift result (flywheel.drift), the time of the last model event (the
registry's alias history and version creation times), and whether a retrain is in
flight (the run ledger: a run that started and has not written its summary).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel import ledger
from flywheel.config import Profile
from flywheel.errors import DataError

# A retrain that started this long ago without a summary is presumed dead (its pod was
# evicted, the machine rebooted) and no longer blocks the monitor.
STALE_RUN_S = 6 * 3600


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str


def decide_retrain(
    *,
    drifted: bool,
    drift_reason: str,
    now: float,
    last_event: float | None,
    cooldown_s: float,
    in_flight: list[str],
) -> RetrainDecision:
    """Retrain only on drift, outside the cooldown, and with no retrain already running."""
    if not drifted:
        return RetrainDecision(False, f"no drift ({drift_reason})")
    if in_flight:
        return RetrainDecision(
            False, f"{drift_reason}; retrain already in flight: {', '.join(in_flight)}"
        )
    if last_event is not None and now - last_event < cooldown_s:
        left = (cooldown_s - (now - last_event)) / 3600
        return RetrainDecision(False, f"{drift_reason}; inside cooldown ({left:.1f} h left)")
    return RetrainDecision(True, drift_reason)


# ------------------------------------------------------------------ thin adapters


def last_model_event(profile: Profile) -> float | None:
    """Epoch seconds of the last promotion/rollback or registered version, or None."""
    from flywheel.registry import Registry

    registry = Registry(profile)
    events = [*registry.history(), *registry.versions()]
    times = [t for t in (_epoch(e) for e in events) if t is not None]
    return max(times) if times else None


def _epoch(item: Any) -> float | None:
    """A history entry's `time` or a version's `created_at`, as epoch seconds."""
    value = getattr(item, "time", None) or getattr(item, "created_at", None)
    return value.timestamp() if value is not None else None


def retrains_in_flight(profile: Profile, exclude_run: str, now: float) -> list[str]:
    """Pipeline runs with a `plan` ledger entry, no `summary`, younger than STALE_RUN_S."""
    import mlflow

    from flywheel.tracking import experiment_id, tracking_uri

    exp = experiment_id(profile)
    client = mlflow.MlflowClient(tracking_uri(profile))
    since = int((now - STALE_RUN_S) * 1000)
    started = client.search_runs(
        [exp],
        filter_string=f"tags.`{ledger.STAGE_TAG}` = 'plan' and attributes.start_time > {since}",
    )
    finished = client.search_runs(
        [exp],
        filter_string=f"tags.`{ledger.STAGE_TAG}` = 'summary' and attributes.start_time > {since}",
    )
    done = {r.data.tags.get(ledger.RUN_TAG) for r in finished}
    runs = {r.data.tags.get(ledger.RUN_TAG) for r in started}
    return sorted(r for r in runs if r and r not in done and r != exclude_run)


REFERENCE_ARTIFACT = "data/reference.parquet"


def champion_reference(profile: Profile, dest: Path) -> tuple[Path, Path]:
    """The champion's drift reference (a sample of its training documents) and its tokenizer.

    Found through lineage: the champion version's `training_run_id` tag names the MLflow
    run that logged the sample (see `flywheel.stages.train`), so it works wherever the
    registry does, without access to the old run's pipeline artifacts.
    """
    import mlflow

    from flywheel.registry import Registry
    from flywheel.tracking import tracking_uri

    registry = Registry(profile)
    champ = registry.champion()
    if champ is None:
        # Name the store: a command run from another directory finds another (empty) one.
        raise DataError(
            f"no champion of {profile.registry.model_name} in the registry at "
            f"{tracking_uri(profile)}: nothing to compare production data with "
            "(train one with `flywheel run`)"
        )
    run_id = champ.tags.get("training_run_id")
    if not run_id:
        raise DataError(f"champion version {champ.version} has no training_run_id lineage tag")
    dest.mkdir(parents=True, exist_ok=True)
    # Through a client bound to the profile's store: the module-level download_artifacts
    # resolves `runs:/` against the process-default store.
    client = mlflow.MlflowClient(tracking_uri(profile))
    ref = client.download_artifacts(run_id, REFERENCE_ARTIFACT, str(dest))
    return Path(ref), registry.download("champion")


def now() -> float:
    return time.time()
