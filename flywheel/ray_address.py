"""A `ray.address` parsed (pure) and probed (one TCP connect), apart from the Ray settings.

`flywheel.config` checks the address when a profile loads, and `flywheel.runtime` (which
reads the profile's Ray settings) connects to it; both import this module, so neither
imports the other upward. The forms are described in `flywheel.runtime`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from flywheel.errors import ConfigError, FlywheelError

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


def probe(addr: RayAddress, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, in one line naming the address, when nothing listens there."""
    if addr.host is None or addr.port is None:
        return
    try:
        socket.create_connection((addr.host, addr.port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FlywheelError(f"cannot reach Ray at {addr.raw}: {reason}") from None


def auth_hint() -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return " (token auth is on here: check that RAY_AUTH_TOKEN/~/.ray/auth_token holds the cluster's token)"
    return (
        " (if the cluster uses token authentication, set RAY_AUTH_MODE=token and the "
        "token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    )


def one_line(text: object) -> str:
    return " ".join(str(text).split())
