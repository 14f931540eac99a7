"""Where Ray runs: the one place that reads `ray.mode`.

Stages call `ensure_ray(profile.ray)` and then use Ray as if it were local; whether
that is a Ray started in this process, an existing cluster, or (on Kubeflow) a
KubeRay RayJob that runs the stage, is decided here and nowhere else.

`ray.address` (mode=address) takes three forms, told apart by `parse_address`:

- `host:port`          the cluster's GCS (what `ray start --head --port` printed);
                       this process joins the cluster as a driver.
- `ray://host:10001`   Ray Client; the driver runs here, its work runs on the cluster.
- `http(s)://host:8265` the dashboard's Jobs API. A stage cannot `ray.init` a URL, so
                       `ensure_ray` refuses it; `submit_job` sends a whole stage there.
- `auto`               the cluster this process already runs in (a Ray Job's driver).

Token authentication (Ray >= 2.59 turns it on for every `ray start` that finds a token
in ~/.ray/auth_token): Ray sends the token to an explicitly named address only when
RAY_AUTH_MODE=token is set. We keep that rule rather than sending a local token to
whatever address a profile names; failures say what to set.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from flywheel.config import RayConfig
from flywheel.errors import ConfigError, FlywheelError
from flywheel.ray_address import RayAddress, auth_hint, one_line, parse_address, probe
from flywheel.runtime.jobs import JobResult, submit_job, wait_job

log = logging.getLogger(__name__)


def init_kwargs(cfg: RayConfig) -> dict:
    """The `ray.init` arguments for a profile's Ray settings (pure, unit-tested)."""
    if cfg.mode == "local":
        # address="local" always starts a new instance. Without it, ray.init() joins
        # whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster (left by `ray start`) names,
        # where num_cpus is refused and the stage would run on someone else's cluster.
        kw: dict = {"address": "local", "include_dashboard": False, "log_to_driver": False}
        if cfg.num_cpus:
            kw["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb:
            kw["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        return kw
    if cfg.mode == "address":
        addr = parse_address(cfg.address or "")
        if addr.kind == "jobs":
            raise ConfigError(
                f"ray.address {addr.raw!r} is the Jobs API (dashboard) URL; a stage run in "
                "this process needs the cluster's GCS address (host:6379) or Ray Client "
                "address (ray://host:10001). Keep the http(s) URL for submitting the stage "
                "as a Ray Job (flywheel.runtime.submit_job)."
            )
        return {"address": addr.raw, "log_to_driver": False}
    # kuberay: the step itself runs inside the RayJob's driver, where Ray is "auto".
    return {"address": "auto", "log_to_driver": False}


def ray_logging_level() -> int:
    """The level for Ray's driver logger: Ray's INFO lines only where this process logs INFO.

    Ray installs its own stderr handler at INFO and prints a banner on every start, and with
    token authentication (on by default since 2.59) a WARNING too. A terminal user asked for
    Flywheel's lines (`--verbose` sets the root logger to DEBUG and brings Ray's back); a
    KFP task's log (the executor logs at INFO) keeps them for whoever reads it.
    """
    return (
        logging.INFO if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.ERROR
    )


def ensure_ray(cfg: RayConfig) -> bool:
    """Initialise Ray once per process. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kw = init_kwargs(cfg)  # a bad address is a ConfigError before anything starts
    if cfg.mode == "kuberay":
        from flywheel.runtime.kuberay_manifest import DRIVER_ENV

        # Only a RayJob's driver has a Ray at "auto"; a step or a shell has none to join.
        if not os.environ.get(DRIVER_ENV):
            raise ConfigError(
                "ray.mode is 'kuberay': the prepare-data, tune and train steps run their stage "
                "in a RayJob of their own (flywheel.runtime.kuberay), not in this process; "
                "here use ray.mode=local or ray.mode=address"
            )
    if cfg.mode == "local":
        # Ray Train/Data worker processes inherit our environment; a stale RAY_ADDRESS
        # from a shell that once ran `ray start` must not point them elsewhere.
        os.environ.pop("RAY_ADDRESS", None)
    elif cfg.mode == "address":
        probe(parse_address(kw["address"]))
    try:
        # logging_level applies before Ray's token set-up logs its WARNING (ray.init's order).
        ray.init(**kw, logging_level=ray_logging_level())
    except ConnectionError as exc:
        # The port answered (probe) but Ray would not talk: most often token auth.
        raise FlywheelError(
            f"cannot connect to Ray at {kw['address']}: {one_line(exc)}{auth_hint()}"
        ) from None
    return True


# ------------------------------------------------------------------ resources
#
# Ray never refuses a request it cannot place: a worker group asking for 4 CPUs on a 2-CPU
# Ray waits for them, and Ray Train retries the start every minute, forever. So a stage
# says what it needs (`Need`, made by flywheel.train.plan) and `ray_session` compares it
# with what Ray has before any worker starts.


@dataclass(frozen=True)
class RayResources:
    """What a Ray cluster has (or, for a local Ray not started yet, will have)."""

    cpus: float
    gpus: float
    node_cpus: float  # the largest node's: one worker cannot span nodes
    node_gpus: float
    where: str = "the Ray cluster"
    cpu_note: str = ""  # where the number comes from, e.g. "ray.num_cpus"
    gpu_note: str = ""
    can_grow: bool = False  # an autoscaling cluster may add nodes when asked


class Need(Protocol):
    """What one stage asks of Ray at once (flywheel.train.plan.ResourceAsk)."""

    def problems(self, available: RayResources) -> list[str]: ...

    def bundles(self) -> list[dict[str, float]]: ...


# Seconds between looks at a cluster that is scaling up.
RESOURCE_POLL_S = 5.0


def local_gpus() -> int:
    """GPUs a local Ray will detect: CUDA_VISIBLE_DEVICES when set, else the NVIDIA devices.

    Read without starting Ray or CUDA (both take seconds). The check after Ray starts uses
    Ray's own count, so this only needs to agree with Ray on ordinary machines.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() not in ("-1", "NoDevFiles")]
        return len(ids)
    return sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def expected_resources(cfg: RayConfig) -> RayResources | None:
    """What Ray has, without starting it: the Ray this process already runs, or what a local
    Ray will get (`ray.num_cpus`, else the machine's CPUs). None when only a started cluster
    can say (mode address/kuberay)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return cluster_resources(cfg)
    if cfg.mode != "local":
        return None
    cpus = float(cfg.num_cpus or os.cpu_count() or 1)
    gpus = float(local_gpus())
    return RayResources(
        cpus=cpus,
        gpus=gpus,
        node_cpus=cpus,
        node_gpus=gpus,
        cpu_note="ray.num_cpus" if cfg.num_cpus else "this machine's CPUs; ray.num_cpus is unset",
        gpu_note="" if gpus else "no GPU visible here",
    )


def cluster_resources(cfg: RayConfig) -> RayResources:
    """What the Ray this process is connected to has (public `ray.cluster_resources`/`ray.nodes`)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # Ray Client may not serve node details; totals are then the bound
        nodes = []
    node_cpus = max((float(n.get("CPU", 0)) for n in nodes), default=cpus)
    node_gpus = max((float(n.get("GPU", 0)) for n in nodes), default=gpus)
    if cfg.mode == "local":
        where, note = "the Ray cluster", "ray.num_cpus" if cfg.num_cpus else ""
    else:
        where, note = f"the Ray cluster at {cfg.address or 'auto'}", ""
    return RayResources(
        cpus=cpus,
        gpus=gpus,
        node_cpus=node_cpus,
        node_gpus=node_gpus,
        where=where,
        cpu_note=note,
        gpu_note="" if gpus else "no GPU found",
        can_grow=cfg.mode != "local",
    )


def _fail(problems: list[str], cls: type[FlywheelError] = ConfigError, tail: str = "") -> NoReturn:
    raise cls(". ".join(problems) + tail)


def check_before_start(cfg: RayConfig, needs: Sequence[Need]) -> None:
    """Fail, naming the profile fields, when a need cannot fit what Ray will have.

    Costs no Ray start; a no-op where only a started cluster can tell (see `expected_resources`).
    """
    available = expected_resources(cfg)
    if available is None or available.can_grow:
        return
    problems = [p for need in needs for p in need.problems(available)]
    if problems:
        _fail(problems)


def wait_for_resources(
    cfg: RayConfig,
    needs: Sequence[Need],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """With Ray up: return when every need fits, or fail.

    A local Ray never grows: fail at once. A cluster (mode address/kuberay) may autoscale:
    ask its autoscaler for the bundles (`ray.autoscaler.sdk.request_resources`, a hint that
    is harmless where no autoscaler runs), say so, and look again for up to
    `ray.resource_wait_s`; then fail, naming the fields. Never an unbounded wait.
    """

    def problems() -> list[str]:
        available = cluster_resources(cfg)
        return [p for need in needs for p in need.problems(available)]

    found = problems()
    if not found:
        return
    if cfg.mode == "local" or cfg.resource_wait_s <= 0:
        _fail(found)
    log.warning(
        "%s; waiting up to %gs (ray.resource_wait_s) for the cluster to scale up",
        ". ".join(found),
        cfg.resource_wait_s,
    )
    _request_resources([b for need in needs for b in need.bundles()])
    try:
        deadline = clock() + cfg.resource_wait_s
        while found and clock() < deadline:
            sleep(RESOURCE_POLL_S)
            found = problems()
    finally:
        _request_resources([])  # withdraw the hint: Ray Train's own request takes over
    if found:
        _fail(
            found,
            FlywheelError,
            f" (waited {cfg.resource_wait_s:g}s, ray.resource_wait_s, for the cluster to scale up)",
        )


def _request_resources(bundles: list[dict[str, float]]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # Ray Client, no GCS KV access: the wait still works
        log.debug("request_resources(%s) not delivered: %s", bundles, exc)


@contextmanager
def ray_session(cfg: RayConfig, needs: Sequence[Need] = ()) -> Iterator[None]:
    """`ensure_ray` for the duration of a block; shuts down only what it started.

    needs: what the block will ask of Ray; checked before Ray starts where that can be
    known (a local Ray), and again against the started cluster, before the block runs.
    """
    import ray

    check_before_start(cfg, needs)
    started = ensure_ray(cfg)
    try:
        if needs:
            wait_for_resources(cfg, needs)
        yield
    finally:
        if started:
            ray.shutdown()


__all__ = [
    "JobResult",
    "Need",
    "RayAddress",
    "RayResources",
    "check_before_start",
    "cluster_resources",
    "ensure_ray",
    "expected_resources",
    "init_kwargs",
    "parse_address",
    "probe",
    "ray_logging_level",
    "ray_session",
    "submit_job",
    "wait_for_resources",
    "wait_job",
]
