"""The run ledger: what each stage of one pipeline run did, kept in MLflow.

KFP's exit handler may only read pipeline parameters and the final status, never the
outputs of the tasks it guards, so the run summary cannot be wired from task outputs.
Every stage therefore records one small MLflow run (tagged with the pipeline run id
and the stage name), and the summary, on this machine or on a cluster, reads them back
from the same tracking store. MLflow is already the shared state of a run; a second
store (a bucket path, a database) would be one more thing to configure.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flywheel.config import Profile
from flywheel.contracts import STAGE_SECONDS

RUN_TAG = "flywheel.pipeline_run_id"
STAGE_TAG = "flywheel.stage"


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            f = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[key] = f
    return out


def record(
    profile: Profile,
    run_id: str,
    stage: str,
    metrics: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> str:
    """Log one stage of pipeline run `run_id`; returns the MLflow run id."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from flywheel.tracking import experiment_id, tracking_uri

    exp = experiment_id(profile)
    client = mlflow.MlflowClient(tracking_uri(profile))
    all_tags = {RUN_TAG: run_id, STAGE_TAG: stage, "mlflow.runName": f"{stage} [{run_id}]"}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = client.create_run(exp, tags=all_tags)
    ts = int(run.info.start_time)
    # One batched call: a stage's ledger entry must never cost more than a blip.
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, ts, 0) for k, v in _finite(metrics or {}).items()],
        tags=[RunTag(k, v) for k, v in all_tags.items() if k.startswith("flywheel.")],
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@dataclass
class StageEntry:
    """What the block inside `stage(...)` fills in: the entry's metrics and tags."""

    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def stage(profile: Profile, run_id: str, name: str, *, timed: bool = True) -> Iterator[StageEntry]:
    """Time the block and record its entry on exit (`stage_seconds` added when `timed`).

    Nothing is recorded when the block raises: a stage that failed has no entry, which is
    how the summary tells a failed stage from one that ran (the run's state says why).
    """
    entry = StageEntry()
    t0 = time.perf_counter()
    yield entry
    metrics = dict(entry.metrics)
    if timed:
        metrics[STAGE_SECONDS] = time.perf_counter() - t0
    record(profile, run_id, name, metrics, entry.tags)


def collect(profile: Profile, run_id: str) -> dict[str, dict[str, Any]]:
    """Stage name -> {"metrics": {...}, "tags": {...}} for one pipeline run (latest wins)."""
    import mlflow

    from flywheel.tracking import experiment_id, tracking_uri

    exp = experiment_id(profile)
    runs = mlflow.MlflowClient(tracking_uri(profile)).search_runs(
        [exp],
        filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        stage = run.data.tags.get(STAGE_TAG)
        if stage:
            out[stage] = {"metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}
    return out
