"""The thin MLflow adapter: one `MlflowClient` per registry, every call bounded and its
failures turned into `RegistryError`s.

MLflow's own HTTP retries (up to minutes with its defaults) are turned off for each call
and replaced by ``registry.retries`` attempts with ``registry.retry_backoff_s``
exponential backoff (tenacity), then a `RegistryError` naming the URI.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from flywheel.config import RegistryConfig
from flywheel.errors import RegistryError

log = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow error codes worth another attempt: the server or the database was briefly away.
_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"}


class NotFoundError(RegistryError):
    """A version, alias or model that the registry does not have."""


class Conflict(RegistryError):
    """Creating something that exists (used for the lock)."""


class _Transient(Exception):
    """One failed attempt worth retrying; carries the cause."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ModelVersionInfo(BaseModel):
    name: str
    version: str
    aliases: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    run_id: str | None = None
    source: str = ""
    created_at: datetime | None = None
    description: str | None = None


def version_info(mv: Any) -> ModelVersionInfo:
    """An MLflow ModelVersion as flywheel's plain record."""
    created = None
    if getattr(mv, "creation_timestamp", None):
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC)
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        aliases=list(getattr(mv, "aliases", None) or []),
        tags=dict(mv.tags or {}),
        run_id=mv.run_id or None,
        source=mv.source or "",
        created_at=created,
        description=mv.description or None,
    )


def _speaks_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextmanager
def _bounded_http(timeout_s: float) -> Iterator[None]:
    """Turn MLflow's own HTTP retries off (and cap each request) while one call runs.

    MLflow 3.x reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` from the environment
    on every request and `MlflowClient` takes no setting for them, so the environment is
    the only public knob. It is set around each call to a tracking *server* (never for a
    local store, which makes no HTTP requests) rather than for the process, so MLflow
    logging elsewhere (training, Ray workers that inherit the environment) keeps its own
    retries.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def short(exc: BaseException | None) -> str:
    text = str(exc) if exc else "no error"
    # MLflow wraps urllib3's long retry message; the first line names the cause.
    return text.splitlines()[0][:200]


class MlflowAdapter:
    """An `MlflowClient` on one tracking/registry URI, with bounded, translated calls."""

    def __init__(self, uri: str, cfg: RegistryConfig) -> None:
        self.uri = uri
        self.cfg = cfg
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _attempt(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from mlflow.exceptions import MlflowException

        try:
            if _speaks_http(self.uri):
                with _bounded_http(self.cfg.http_timeout_s):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        except MlflowException as exc:
            code = exc.error_code
            if code == "RESOURCE_DOES_NOT_EXIST":
                raise NotFoundError(f"{what}: {exc.message}") from None
            if code == "RESOURCE_ALREADY_EXISTS":
                raise Conflict(f"{what}: {exc.message}") from None
            if code not in _TRANSIENT:
                raise RegistryError(
                    f"{what} refused by MLflow at {self.uri}: {exc.message}"
                ) from None
            raise _Transient(exc) from None
        except OSError as exc:  # requests' ConnectionError is an OSError
            raise _Transient(exc) from None

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one MLflow call with bounded retries; every failure becomes a RegistryError."""
        attempts = self.cfg.retries + 1

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s failed (%s); retry %d/%d in %.1fs",
                what,
                short(exc.cause if isinstance(exc, _Transient) else exc),
                state.attempt_number,
                attempts - 1,
                state.next_action.sleep if state.next_action else 0.0,
            )

        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=self.cfg.retry_backoff_s, min=0),
            retry=retry_if_exception_type(_Transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, what, fn, *args, **kwargs)
        except _Transient as exc:
            raise RegistryError(
                f"MLflow at {self.uri} unreachable or failing: {what} failed after {attempts} "
                f"attempt(s) ({short(exc.cause)}); check registry.tracking_uri / "
                "MLFLOW_TRACKING_URI"
            ) from None
