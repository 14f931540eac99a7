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
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import Profile
from flywheel.contracts import STAGE_SECONDS

RUN_TAG = "flywheel.pipeline_run_id"
STAGE_TAG = "flywheel.stage"
# The process that drives a run on this machine (`flywheel run` / `monitor`: kfp.local runs
# the DAG inside it), on the run's plan entry: the monitor tells a run still going from one
# whose driver is gone (Ctrl-C, a closed terminal), which would otherwise count as "in
# flight" until it grew stale. Set by the driver in its environment, which kfp.local's task
# processes inherit; a run on Kubeflow has none (its pods are not the driver).
DRIVER_TAG = "flywheel.driver"
DRIVER_ENV = "FLYWHEEL_RUN_DRIVER"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


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


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot; Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def driver_mark(pid: int | None = None) -> str | None:
    """Names this process (or `pid`) so that no other process, now or after a reboot, has the
    same name: host, boot id, pid, start time. None where /proc cannot tell (not Linux)."""
    pid = os.getpid() if pid is None else pid
    ticks = _start_ticks(pid)
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{pid}/{ticks}" if ticks else None


def driver_alive(mark: str) -> bool | None:
    """Whether the process a `driver_mark` names is still running: None when this machine
    cannot tell (another host, no /proc), so the caller falls back on the run's age."""
    parts = mark.split("/")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return None
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        return None
    if parts[1] != boot:
        return False  # the machine rebooted since: every process of then is gone
    return parts[2].isdigit() and _start_ticks(int(parts[2])) == parts[3]


def driver_tags() -> dict[str, str]:
    """The plan entry's driver tag, when a local driver set one in the environment."""
    mark = os.environ.get(DRIVER_ENV)
    return {DRIVER_TAG: mark} if mark else {}


@contextlib.contextmanager
def driving() -> Iterator[None]:
    """Mark the processes started in the block (kfp.local's tasks) as driven by this one."""
    mark = driver_mark()
    old = os.environ.get(DRIVER_ENV)
    if mark:
        os.environ[DRIVER_ENV] = mark
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DRIVER_ENV, None)
        else:
            os.environ[DRIVER_ENV] = old


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
