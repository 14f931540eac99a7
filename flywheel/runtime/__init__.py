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
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from flywheel.config import RayConfig
from flywheel.errors import ConfigError, FlywheelError

log = logging.getLogger(__name__)

AddressKind = Literal["gcs", "client", "jobs", "auto"]

# Ray Client's port when a ray:// address names none (`ray start --ray-client-server-port`).
RAY_CLIENT_PORT = 10001
# Ray retries an unreachable GCS for minutes before `ray.init` gives up (measured: >120 s
# on 2.60); a plain TCP connect answers in milliseconds, so we probe first with this bound.
PROBE_TIMEOUT_S = 5.0

_FORMS = "host:port (GCS), ray://host:10001 (Ray Client) or http(s)://host:8265 (Jobs API)"


@dataclass(frozen=True)
class RayAddress:
    """A parsed `ray.address`. `host`/`port` are what `probe` connects to (None for auto)."""

    kind: AddressKind
    raw: str
    host: str | None = None
    port: int | None = None


def parse_address(address: str) -> RayAddress:
    """Classify `ray.address` (pure). Raises ConfigError naming the field for anything else."""
    raw = address.strip()
    if raw == "auto":
        return RayAddress("auto", raw)
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme and scheme not in ("ray", "http", "https"):
        raise ConfigError(f"ray.address {raw!r}: unknown scheme {scheme!r}; give {_FORMS}")
    try:
        url = urlsplit(raw if scheme else f"tcp://{raw}")
        port = url.port
    except ValueError:
        raise ConfigError(f"ray.address {raw!r}: bad port; give {_FORMS}") from None
    if not url.hostname or url.path not in ("", "/"):
        raise ConfigError(f"ray.address {raw!r} is not a Ray address; give {_FORMS}")
    if scheme == "ray":
        return RayAddress("client", raw, url.hostname, port or RAY_CLIENT_PORT)
    if scheme in ("http", "https"):
        # No port in a URL means the scheme's port, as for `requests` (e.g. an ingress).
        return RayAddress(
            "jobs", raw.rstrip("/"), url.hostname, port or (443 if scheme == "https" else 80)
        )
    if port is None:
        raise ConfigError(
            f"ray.address {raw!r}: a GCS address needs a port (ray start --head uses 6379); "
            f"give {_FORMS}"
        )
    return RayAddress("gcs", raw, url.hostname, port)


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


def probe(addr: RayAddress, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, in one line naming the address, when nothing listens there."""
    if addr.host is None or addr.port is None:
        return
    try:
        socket.create_connection((addr.host, addr.port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FlywheelError(f"cannot reach Ray at {addr.raw}: {reason}") from None


def _auth_hint() -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return " (token auth is on here: check that RAY_AUTH_TOKEN/~/.ray/auth_token holds the cluster's token)"
    return (
        " (if the cluster uses token authentication, set RAY_AUTH_MODE=token and the "
        "token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def ensure_ray(cfg: RayConfig) -> bool:
    """Initialise Ray once per process. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kw = init_kwargs(cfg)  # a bad address is a ConfigError before anything starts
    if cfg.mode == "local":
        # Ray Train/Data worker processes inherit our environment; a stale RAY_ADDRESS
        # from a shell that once ran `ray start` must not point them elsewhere.
        os.environ.pop("RAY_ADDRESS", None)
    elif cfg.mode == "address":
        probe(parse_address(kw["address"]))
    try:
        ray.init(**kw)
    except ConnectionError as exc:
        # The port answered (probe) but Ray would not talk: most often token auth.
        raise FlywheelError(
            f"cannot connect to Ray at {kw['address']}: {_one_line(exc)}{_auth_hint()}"
        ) from None
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


from flywheel.runtime.jobs import JobResult, submit_job, wait_job  # noqa: E402

__all__ = [
    "JobResult",
    "RayAddress",
    "ensure_ray",
    "init_kwargs",
    "parse_address",
    "probe",
    "ray_session",
    "submit_job",
    "wait_job",
]
