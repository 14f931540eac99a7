"""Reach every service a run depends on before the run does any work.

On a cluster a run's state lives in services named in the profile: the MLflow tracking
server (registry, ledger), the tuning database, object storage. A step that finds one of
them unreachable halfway through the DAG has already spent its data and training time, and
a gate that cannot reach the registry after training is the worst place to learn it. The
plan step therefore calls `check(profile)` first: each service is tried once, with a short
bound, and every failure is reported in one line naming the profile field and the service.

Local stores (a SQLite file, a path) are created on demand and need no check.
"""

from __future__ import annotations

from flywheel.config import Profile
from flywheel.errors import FlywheelError

DB_CONNECT_TIMEOUT_S = 5


class ServiceError(FlywheelError):
    """A service named in the profile cannot be reached or refuses us."""


def _tracking_problem(profile: Profile) -> str | None:
    from flywheel.errors import RegistryError
    from flywheel.registry import Registry
    from flywheel.tracking import tracking_uri

    uri = tracking_uri(profile)
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        Registry(profile).ping()
    except RegistryError as exc:
        return f"registry.tracking_uri ({uri}, MLflow tracking server): {exc}"
    return None


def _database_problem(profile: Profile) -> str | None:
    url = profile.tune.storage
    if not (profile.tune.enabled and url) or url.startswith("sqlite"):
        return None
    import sqlalchemy

    from flywheel.tune.space import masked

    # Bounded: libpq and MySQL drivers otherwise wait for the OS's TCP timeout (minutes).
    args = (
        {"connect_timeout": DB_CONNECT_TIMEOUT_S} if url.startswith(("postgres", "mysql")) else {}
    )
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # every driver raises its own classes; the first line says why
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"tune.storage ({masked(url)}, Optuna database): {line}"
    return None


def _storage_problem(profile: Profile) -> str | None:
    from flywheel.storage import ray_storage

    if not profile.storage.root:
        return None
    try:
        ray_storage(profile, check=True)
    except FlywheelError as exc:
        return str(exc)
    return None


def problems(profile: Profile) -> list[str]:
    """One line per service that cannot be reached (empty: all answer)."""
    checks = (_tracking_problem, _database_problem, _storage_problem)
    return [p for p in (check(profile) for check in checks) if p]


def check(profile: Profile) -> None:
    """Raise ServiceError naming every unreachable service, before any work starts."""
    found = problems(profile)
    if found:
        raise ServiceError("; ".join(found))
