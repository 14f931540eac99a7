"""Where Ray runs: the one place that reads `ray.mode`.

Stages call `ensure_ray(profile.ray)` and then use Ray as if it were local; whether
that is a Ray started in this process, an existing cluster, or (on Kubeflow) a
KubeRay RayJob that runs the stage, is decided here and nowhere else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from flywheel.config import RayConfig
from flywheel.errors import FlywheelError

log = logging.getLogger(__name__)


def init_kwargs(cfg: RayConfig) -> dict:
    """The `ray.init` arguments for a profile's Ray settings (pure, unit-tested)."""
    if cfg.mode == "local":
        kw: dict = {"include_dashboard": False, "log_to_driver": False}
        if cfg.num_cpus:
            kw["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb:
            kw["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        return kw
    if cfg.mode == "address":
        return {"address": cfg.address, "log_to_driver": False}
    # kuberay: the step itself runs inside the RayJob's driver, where Ray is "auto".
    return {"address": "auto", "log_to_driver": False}


def ensure_ray(cfg: RayConfig) -> bool:
    """Initialise Ray once per process. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # A worker process for Ray Train must not inherit a stale RAY_ADDRESS from a shell
    # that once ran `ray start`; in local mode we always want a fresh local instance.
    if cfg.mode == "local":
        os.environ.pop("RAY_ADDRESS", None)
    try:
        ray.init(**init_kwargs(cfg))
    except ConnectionError as exc:
        raise FlywheelError(f"cannot reach Ray at {cfg.address or 'auto'}: {exc}") from None
    return True


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """`ensure_ray` for the duration of a block; shuts down only what it started."""
    import ray

    started = ensure_ray(cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
