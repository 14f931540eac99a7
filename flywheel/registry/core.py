"""The model registry: a thin adapter over MLflow's, with aliases (never the deprecated stages).

- Every evaluated candidate is a version of ``registry.model_name``, logged with MLflow's
  transformers flavour (so ``mlflow models serve -m models:/<name>@champion`` serves it),
  born with its lineage tags, then given the alias ``challenger``.
- Alias ``champion`` is production. Every move of it (promotion, manual promotion,
  rollback) goes through one function, `Registry._move`, which appends an entry to the
  history first, sets the target version's promotion tags, and moves the alias last.

History lives in the registry itself, as one tag per move on the registered model:
``flywheel.history.00000042 = {"seq": 42, "time": ..., "actor": ..., "kind": ...,
"from": "3", "to": "4", "reason": ...}``. One key per move, never rewritten, makes it
append-only by construction; a single JSON-lines tag would be read-modify-written on
every move (a lost update under races) and would grow past the 5,000-character tag limit
of SQL-backed stores. Any MLflow client (the UI, another tool) can read it back without
flywheel.

Alias moves are serialised by a lock that needs nothing but the registry: a registered
model named ``<name>--alias-lock``, whose creation is atomic in every MLflow store
(a unique name). Processes on different machines (two KFP pods) share no file system,
so a file lock would not do. A lock older than ``registry.lock_stale_s`` is from a dead
process and is broken.

Every MLflow call goes through `Registry._call`: MLflow's own HTTP retries (up to minutes
with its defaults) are turned off for the call and replaced by ``registry.retries`` with
``registry.retry_backoff_s`` exponential backoff, then a `RegistryError` naming the URI.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from flywheel import artifacts
from flywheel.config import Profile
from flywheel.errors import RegistryError
from flywheel.tracking import artifact_location, tracking_uri

if TYPE_CHECKING:
    from flywheel.evaluate.report import EvalReport
    from flywheel.gate import Decision

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_PREFIX = "flywheel.history."
LOCK_SUFFIX = "--alias-lock"
LATEST = "latest"
MODEL_ARTIFACT = "model"
CARD_ARTIFACT = "model_card.md"
# Lineage tag keys on each version, as the pipeline writes them (`lineage_tags` builds
# them); plain keys so any MLflow client reads `training_run_id` without knowing flywheel.
TAG_DATA_HASH = "data_manifest_hash"
TAG_TRAINING_RUN = "training_run_id"
TAG_PIPELINE_RUN = "pipeline_run_id"
TAG_TRIGGER = "trigger_reason"
TAG_VERDICT = "verdict"
TAG_REASONS = "verdict_reasons"
METRIC_PREFIX = "challenger_"  # EvalReport.metrics("challenger_") at registration
DELTA_PREFIX = "delta_"
# Tags flywheel itself maintains.
TAG_FLAVOR = "flywheel.flavor"
TAG_REGISTERED_BY = "flywheel.registered_by"
# SQL-backed stores cap registered-model tags and descriptions at 5,000 characters.
_MAX_TEXT = 4900
# MLflow error codes worth another attempt: the server or the database was briefly away.
_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"}

T = TypeVar("T")


class NotFoundError(RegistryError):
    """A version, alias or model that the registry does not have."""


class _Conflict(RegistryError):
    """Creating something that exists (used for the lock)."""


class HistoryEntry(BaseModel):
    """One move of the champion alias. Serialised with the keys `from` and `to`."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    seq: int
    time: datetime
    actor: str
    kind: Literal["promotion", "manual", "rollback"]
    from_version: str | None = Field(None, alias="from")
    to_version: str = Field(alias="to")
    reason: str

    def to_tag(self) -> str:
        return self.model_dump_json(by_alias=True)


class ModelVersionInfo(BaseModel):
    name: str
    version: str
    aliases: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    run_id: str | None = None
    source: str = ""
    created_at: datetime | None = None
    description: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def verdict(self) -> str | None:
        return self.tags.get(TAG_VERDICT)

    @property
    def metrics(self) -> dict[str, float]:
        out = {}
        for k, v in self.tags.items():
            if k.startswith(METRIC_PREFIX):
                try:
                    out[k.removeprefix(METRIC_PREFIX)] = float(v)
                except ValueError:
                    continue
        return out


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _clip(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"


def lineage_tags(
    *,
    data_hash: str | None = None,
    training_run_id: str | None = None,
    pipeline_run_id: str | None = None,
    trigger_reason: str | None = None,
    report: EvalReport | None = None,
    decision: Decision | None = None,
) -> dict[str, str]:
    """The lineage tags of a candidate version, for `Registry.register_candidate`."""
    tags = {
        TAG_DATA_HASH: data_hash or (report.data_hash if report else None),
        TAG_TRAINING_RUN: training_run_id,
        TAG_PIPELINE_RUN: pipeline_run_id,
        TAG_TRIGGER: trigger_reason,
    }
    out = {k: str(v) for k, v in tags.items() if v}
    if report is not None:
        out.update({k: f"{v:.6g}" for k, v in report.metrics(METRIC_PREFIX).items()})
    if decision is not None:
        out.update(_verdict_tags(decision))
    return out


def _verdict_tags(decision: Decision) -> dict[str, str]:
    out = {TAG_VERDICT: decision.verdict, TAG_REASONS: _clip(json.dumps(decision.reasons))}
    out.update({f"{DELTA_PREFIX}{k}": f"{v:.6g}" for k, v in decision.deltas.items()})
    return out


@contextmanager
def _bounded_http(timeout_s: float) -> Iterator[None]:
    """Turn MLflow's own HTTP retries off (and cap each request) while one call runs.

    MLflow reads these environment variables per request; its defaults retry for minutes,
    which would make `registry.retries` meaningless. Set around each call rather than for
    the process, so MLflow logging elsewhere (training) keeps its own behaviour.
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


class Registry:
    """Versions, aliases and alias history of one registered model (``registry.model_name``)."""

    def __init__(self, profile: Profile, *, name: str | None = None) -> None:
        self.profile = profile
        self.cfg = profile.registry
        self.name = name or self.cfg.model_name
        self.uri = tracking_uri(profile)
        self._client_obj: Any = None

    # ------------------------------------------------------------ plumbing

    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client_obj

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one MLflow call with bounded retries; every failure becomes a RegistryError."""
        from mlflow.exceptions import MlflowException

        attempts = self.cfg.retries + 1
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                with _bounded_http(self.cfg.http_timeout_s):
                    return fn(*args, **kwargs)
            except MlflowException as exc:
                code = exc.error_code
                if code == "RESOURCE_DOES_NOT_EXIST":
                    raise NotFoundError(f"{what}: {exc.message}") from None
                if code == "RESOURCE_ALREADY_EXISTS":
                    raise _Conflict(f"{what}: {exc.message}") from None
                if code not in _TRANSIENT:
                    raise RegistryError(
                        f"{what} refused by MLflow at {self.uri}: {exc.message}"
                    ) from None
                last = exc
            except OSError as exc:  # requests' ConnectionError is an OSError
                last = exc
            if attempt + 1 < attempts:
                delay = self.cfg.retry_backoff_s * 2**attempt
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1fs",
                    what,
                    _short(last),
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise RegistryError(
            f"MLflow at {self.uri} unreachable or failing: {what} failed after {attempts} "
            f"attempt(s) ({_short(last)}); check registry.tracking_uri / MLFLOW_TRACKING_URI"
        )

    def ping(self) -> None:
        """One bounded request to the tracking server (RegistryError when it does not answer)."""
        self._call("reach the tracking server", self._client.search_experiments, max_results=1)

    def _registered(self, create: bool = False) -> Any:
        try:
            return self._call(
                f"read model {self.name}", self._client.get_registered_model, self.name
            )
        except NotFoundError:
            if not create:
                raise NotFoundError(
                    f"registered model '{self.name}' not found at {self.uri}"
                ) from None
        with suppress(_Conflict):  # another process created it first
            self._call(
                f"create model {self.name}",
                self._client.create_registered_model,
                self.name,
                description="Causal LM trained by the flywheel retraining pipeline. "
                "Alias 'champion' is production; tags flywheel.history.* are the alias history.",
            )
        return self._call(f"read model {self.name}", self._client.get_registered_model, self.name)

    def _version(self, version_or_alias: str) -> ModelVersionInfo:
        ref = str(version_or_alias).strip()
        if ref.lower() == LATEST:
            # MLflow reserves "latest" (no alias may take the name): the newest version.
            versions = self.versions()
            if not versions:
                raise NotFoundError(f"{self.name} has no versions at {self.uri}")
            return versions[-1]
        if not ref.isdigit():
            # Resolved through the registered model's alias map: MLflow answers a missing
            # alias with INVALID_PARAMETER_VALUE, indistinguishable from a real refusal.
            version = self._registered().aliases.get(ref)
            if version is None:
                raise NotFoundError(f"{self.name} has no alias '{ref}' at {self.uri}")
            ref = str(version)
        try:
            mv = self._call(
                f"read {self.name} version {ref}", self._client.get_model_version, self.name, ref
            )
        except NotFoundError:
            raise NotFoundError(f"{self.name} has no version {ref} at {self.uri}") from None
        return _info(mv)

    def _experiment_id(self) -> str:
        name = self.cfg.experiment
        exp = self._call(f"read experiment {name}", self._client.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._call(
                f"create experiment {name}",
                self._client.create_experiment,
                name,
                artifact_location=artifact_location(self.profile),
            )
        except _Conflict:
            exp = self._call(f"read experiment {name}", self._client.get_experiment_by_name, name)
            return exp.experiment_id

    # ------------------------------------------------------------ reading

    def versions(self) -> list[ModelVersionInfo]:
        """Every version, oldest first, with aliases filled in from the registered model."""
        try:
            rm = self._registered()
        except NotFoundError:
            return []
        by_version: dict[str, list[str]] = {}
        for alias, version in rm.aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        out: list[ModelVersionInfo] = []
        token = None
        while True:
            page = self._call(
                f"list versions of {self.name}",
                self._client.search_model_versions,
                f"name='{self.name}'",
                page_token=token,
            )
            out.extend(_info(mv) for mv in page)
            token = page.token
            if not token:
                break
        for info in out:
            info.aliases = sorted(by_version.get(info.version, []))
        return sorted(out, key=lambda v: int(v.version))

    def version(self, version_or_alias: str) -> ModelVersionInfo:
        return self._version(version_or_alias)

    def champion(self) -> ModelVersionInfo | None:
        try:
            return self._version(CHAMPION)
        except NotFoundError:
            return None

    def champion_uri(self) -> str | None:
        """``models:/<name>@champion`` when a champion exists (what training warm-starts from)."""
        return f"models:/{self.name}@{CHAMPION}" if self.champion() else None

    def history(self) -> list[HistoryEntry]:
        """Every champion move, oldest first, read from the registered model's tags."""
        try:
            rm = self._registered()
        except NotFoundError:
            return []
        return _history(rm.tags)

    # ------------------------------------------------------------ writing

    def register_candidate(
        self,
        model_dir: Path,
        *,
        tags: dict[str, str],
        model_card: str,
        run_id: str | None = None,
    ) -> str:
        """Log `model_dir` (a save_pretrained directory) as a new version with alias
        `challenger`; returns the version. The version is created with its tags, so no
        reader ever sees it without its lineage."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RegistryError(f"{model_dir}: not a model directory (no config.json)")
        self._registered(create=True)
        existing = self._registered_by(tags)
        if existing is not None:
            # A retried gate step (KFP retries, or a pod evicted after registering) must not
            # leave a second version of the same candidate: the same pipeline run and training
            # run is the same candidate. Re-pointing the alias makes the retry complete.
            log.info("version %s already registers this candidate; reusing it", existing)
            self._call(
                f"set alias {CHALLENGER}",
                self._client.set_registered_model_alias,
                self.name,
                CHALLENGER,
                existing,
            )
            return existing
        if run_id is None:
            run = self._call(
                "create registration run",
                self._client.create_run,
                self._experiment_id(),
                run_name=f"register-{self.name}",
                tags={"flywheel.kind": "register-candidate"},
            )
            run_id = run.info.run_id
            own_run = True
        else:
            own_run = False
        run = self._call(f"read run {run_id}", self._client.get_run, run_id)
        with tempfile.TemporaryDirectory(prefix="flywheel-register-") as tmp:
            local = Path(tmp) / MODEL_ARTIFACT
            flavor = _save_mlflow_model(model_dir, local, model_card)
            self._call(
                f"upload model to run {run_id}",
                self._client.log_artifacts,
                run_id,
                str(local),
                MODEL_ARTIFACT,
            )
        self._call("upload model card", self._client.log_text, run_id, model_card, CARD_ARTIFACT)
        if own_run:
            self._call("finish registration run", self._client.set_terminated, run_id)
        all_tags = {
            **{k: _clip(str(v), 100_000) for k, v in tags.items()},
            TAG_FLAVOR: flavor,
            TAG_REGISTERED_BY: "flywheel",
        }
        mv = self._call(
            f"create a version of {self.name}",
            self._client.create_model_version,
            self.name,
            f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}",
            run_id=run_id,
            tags=all_tags,
            description=_clip(model_card),
        )
        version = str(mv.version)
        self._call(
            f"set alias {CHALLENGER}",
            self._client.set_registered_model_alias,
            self.name,
            CHALLENGER,
            version,
        )
        log.info("registered %s version %s (%s flavour)", self.name, version, flavor)
        return version

    def _registered_by(self, tags: dict[str, str]) -> str | None:
        """The version already registered for this pipeline run's candidate, if any."""
        keys = (TAG_PIPELINE_RUN, TAG_TRAINING_RUN)
        if not all(tags.get(k) for k in keys):
            return None  # no identity to match on: every call is a new candidate
        found = [
            v.version for v in self.versions() if all(v.tags.get(k) == str(tags[k]) for k in keys)
        ]
        return found[-1] if found else None

    def set_verdict(self, version: str, decision: Decision) -> None:
        """Record the gate's verdict, reasons and deltas on a version."""
        self._version(version)
        for key, value in _verdict_tags(decision).items():
            self._call(
                f"tag version {version}",
                self._client.set_model_version_tag,
                self.name,
                str(version),
                key,
                value,
            )

    def promote(
        self,
        version: str,
        *,
        reason: str,
        actor: str,
        kind: Literal["promotion", "manual"] = "promotion",
    ) -> HistoryEntry:
        """Make `version` the champion. `kind` is "promotion" for the gate, "manual" for a person."""
        return self._move(kind, reason, actor, lambda _cur, _hist: str(version))

    def rollback(self, *, to: str | None = None, reason: str, actor: str) -> HistoryEntry:
        """Move champion back: to `to`, or else to the version that was champion before it."""

        def target(current: str | None, history: list[HistoryEntry]) -> str:
            if to is not None:
                return str(to)
            if current is None:
                raise RegistryError(f"{self.name} has no champion to roll back from")
            return rollback_target(history, current, self.name)

        return self._move("rollback", reason, actor, target)

    def _move(
        self,
        kind: Literal["promotion", "manual", "rollback"],
        reason: str,
        actor: str,
        choose: Callable[[str | None, list[HistoryEntry]], str],
    ) -> HistoryEntry:
        if not reason.strip():
            raise RegistryError("a reason is required for every champion move")
        with self._alias_lock():
            # Read inside the lock: `from` and the next sequence number are then exact.
            rm = self._registered()
            current = rm.aliases.get(CHAMPION)
            current = str(current) if current is not None else None
            history = _history(rm.tags)
            target = self._version(choose(current, history))
            # The number, never the word: "champion" or "latest" resolved here is what the
            # tags, the history and the alias move record (MLflow refuses a word there).
            to = target.version
            if target.tags.get(TAG_REGISTERED_BY) != "flywheel":
                raise RegistryError(
                    f"{self.name} version {to} has no flywheel lineage tags; refusing to make "
                    "it champion"
                )
            if to == current:
                raise RegistryError(f"{self.name} version {to} is already the champion")
            entry = HistoryEntry.model_validate(
                {
                    "seq": (history[-1].seq + 1) if history else 1,
                    "time": _now(),
                    "actor": actor,
                    "kind": kind,
                    "from": current,
                    "to": to,
                    "reason": _clip(reason, 2000),
                }
            )
            # Order matters. 1: the target's promotion tags, so the alias never points at a
            # version without them. 2: the history entry, so no alias move is ever off the
            # record (a crash between 2 and 3 leaves an entry whose `to` is not the champion,
            # visible as such; the next entry's `from` records the true state). 3: the alias.
            for key, value in {
                "flywheel.promoted_at": entry.time.isoformat(),
                "flywheel.promoted_by": actor,
                "flywheel.promotion_kind": kind,
                "flywheel.promotion_reason": entry.reason,
            }.items():
                self._call(
                    f"tag version {to}",
                    self._client.set_model_version_tag,
                    self.name,
                    to,
                    key,
                    value,
                )
            key = f"{HISTORY_PREFIX}{entry.seq:08d}"
            self._call(
                "append alias history",
                self._client.set_registered_model_tag,
                self.name,
                key,
                entry.to_tag(),
            )
            try:
                self._call(
                    f"move alias {CHAMPION} to version {to}",
                    self._client.set_registered_model_alias,
                    self.name,
                    CHAMPION,
                    to,
                )
            except RegistryError as exc:
                try:
                    # The move did not happen: withdraw its record (it was never in effect).
                    self._call(
                        "withdraw history entry",
                        self._client.delete_registered_model_tag,
                        self.name,
                        key,
                    )
                except RegistryError:
                    raise RegistryError(
                        f"{exc}; history entry {entry.seq} records a move that did not happen"
                    ) from None
                raise
        log.info("%s: champion %s -> %s (%s by %s)", self.name, current, to, kind, actor)
        return entry

    @contextmanager
    def _alias_lock(self) -> Iterator[None]:
        lock = f"{self.name}{LOCK_SUFFIX}"
        owner = f"{default_actor()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + self.cfg.lock_timeout_s
        delay = 0.05
        while True:
            try:
                self._call(
                    "acquire the alias lock",
                    self._client.create_registered_model,
                    lock,
                    tags={"flywheel.lock.owner": owner, "flywheel.lock.since": repr(time.time())},
                    description=f"Transient lock serialising alias moves of {self.name}.",
                )
                break
            except _Conflict:
                pass
            try:
                held = self._call("read the alias lock", self._client.get_registered_model, lock)
            except NotFoundError:
                continue  # released meanwhile: try again at once
            since = float(held.tags.get("flywheel.lock.since", "0") or 0)
            age = time.time() - since
            if age > self.cfg.lock_stale_s:
                # Its owner died mid-move. Two breakers racing here could both delete and
                # re-create; the window is one round trip after a crash, accepted.
                log.warning(
                    "breaking a stale alias lock (%s, %.0fs old)",
                    held.tags.get("flywheel.lock.owner"),
                    age,
                )
                with suppress(NotFoundError):
                    self._call("break a stale lock", self._client.delete_registered_model, lock)
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"another alias move of {self.name} holds the lock "
                    f"({held.tags.get('flywheel.lock.owner')}, {age:.0f}s); gave up after "
                    f"{self.cfg.lock_timeout_s:g}s (registry.lock_timeout_s)"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        try:
            yield
        finally:
            try:
                self._call("release the alias lock", self._client.delete_registered_model, lock)
            except RegistryError as exc:
                log.warning(
                    "could not release %s (%s); it expires after %gs",
                    lock,
                    exc,
                    self.cfg.lock_stale_s,
                )

    # ------------------------------------------------------------ download

    def download(self, version_or_alias: str) -> Path:
        """A local save_pretrained directory (model + tokenizer) of a version or alias.

        Cached under the state dir by version number (a version's files never change);
        an alias is resolved first, so `download("champion")` follows the alias.
        """
        info = self._version(version_or_alias)
        cache = self.profile.state_path("registry-cache", _safe(self.name))
        dest = cache / f"v{info.version}"
        if (dest / ".complete").is_file():
            return dest
        staging = Path(tempfile.mkdtemp(prefix=f".v{info.version}-", dir=cache))
        try:
            fetched = staging / "fetched"
            fetched.mkdir()
            if info.run_id and info.source.rstrip("/").endswith(f"/{MODEL_ARTIFACT}"):
                self._call(
                    f"download version {info.version}",
                    self._client.download_artifacts,
                    info.run_id,
                    MODEL_ARTIFACT,
                    str(fetched),
                )
                fetched = fetched / MODEL_ARTIFACT
            else:
                import mlflow.artifacts

                fetched = Path(
                    self._call(
                        f"download version {info.version}",
                        mlflow.artifacts.download_artifacts,
                        artifact_uri=info.source,
                        dst_path=str(fetched),
                        tracking_uri=self.uri,
                    )
                )
            out = staging / "model"
            _flatten(fetched, out)
            if not (out / "config.json").is_file():
                raise RegistryError(
                    f"{self.name} version {info.version} ({info.source}) holds no Hugging Face "
                    "model (no config.json)"
                )
            (out / ".complete").write_text(info.version)
            try:
                os.replace(out, dest)
            except OSError:
                if not (dest / ".complete").is_file():  # a concurrent download won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest


# ---------------------------------------------------------------- helpers


def _short(exc: Exception | None) -> str:
    text = str(exc) if exc else "no error"
    # MLflow wraps urllib3's long retry message; the first line names the cause.
    return text.splitlines()[0][:200]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _info(mv: Any) -> ModelVersionInfo:
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


def _history(tags: dict[str, str]) -> list[HistoryEntry]:
    entries = []
    for key, value in tags.items():
        if key.startswith(HISTORY_PREFIX):
            try:
                entries.append(HistoryEntry.model_validate_json(value))
            except ValueError:
                log.warning("ignoring unreadable history tag %s", key)
    return sorted(entries, key=lambda e: e.seq)


def rollback_target(history: list[HistoryEntry], current: str, name: str = "model") -> str:
    """The champion before the current one, with rollbacks undone like a stack.

    Replays the history: a promotion pushes the version it replaced; a rollback to the top
    of that stack pops it (a rollback elsewhere, with --to, counts as a move). So after
    1 -> 2 -> 3, two rollbacks give 2 then 1, not 2, 3, 2, ...
    """
    stack: list[str | None] = []
    for e in history:
        if e.kind == "rollback" and stack and stack[-1] == e.to_version:
            stack.pop()
        else:
            stack.append(e.from_version)
    if not history or history[-1].to_version != current:
        raise RegistryError(
            f"{name}: the champion ({current}) was not set through flywheel's history; "
            "name a version with --to"
        )
    if not stack or stack[-1] is None:
        raise RegistryError(
            f"{name}: no earlier champion than version {current} in the history; name one with --to"
        )
    return stack[-1]


def _flatten(fetched: Path, out: Path) -> None:
    """An MLflow transformers model (MLmodel, model/, components/tokenizer/) becomes one
    save_pretrained directory; anything else (the raw fallback) is copied as is."""
    if (fetched / "MLmodel").is_file() and (fetched / "model").is_dir():
        shutil.copytree(fetched / "model", out)
        tokenizer = fetched / "components" / "tokenizer"
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, out, dirs_exist_ok=True)
        if (fetched / CARD_ARTIFACT).is_file():
            shutil.copy2(fetched / CARD_ARTIFACT, out / CARD_ARTIFACT)
    else:
        shutil.copytree(fetched, out)


def _save_mlflow_model(model_dir: Path, out: Path, model_card: str) -> str:
    """Save with the transformers flavour; returns the flavour used ("transformers" | "raw").

    Loaded from an absolute path, so MLflow sees a local model and skips the Hub lookups
    (model card, license) it would otherwise make. Requirements are given, not inferred:
    inference loads the model in a subprocess (tens of seconds) for a list we know.
    """
    try:
        import mlflow.transformers
        import torch
        import transformers
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = model_dir.resolve()
        model = AutoModelForCausalLM.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
        context = int(
            getattr(model.config, "n_positions", None)
            or getattr(model.config, "max_position_embeddings", None)
            or 1024
        )
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(out),
            task="text-generation",
            model_card=ModelCard(model_card),
            # Serving defaults: a tiny context must not be overrun by the pipeline's 256.
            model_config={"max_new_tokens": max(1, min(64, context // 2))},
            pip_requirements=[
                f"transformers=={transformers.__version__}",
                f"torch=={torch.__version__.split('+')[0]}",
            ],
        )
        flavor = "transformers"
        extra_dir = out / "model"
    except Exception as exc:
        # Fallback: a model the flavour cannot wrap (an architecture without a
        # text-generation pipeline, a flavour bug in a new transformers) is still registered
        # as its raw save_pretrained files: from_pretrained, evaluation and warm starts work;
        # only `mlflow models serve` does not. The version's flywheel.flavor tag says which.
        log.warning(
            "transformers flavour could not save %s (%s); logging raw files", model_dir, exc
        )
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(model_dir, out)
        (out / CARD_ARTIFACT).write_text(model_card)
        return "raw"
    # Files the flavour does not know (training summary) travel next to the weights.
    for name in (artifacts.TRAINING_INFO,):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, extra_dir / name)
    return flavor


def model_card(
    profile: Profile,
    model_dir: Path,
    manifest: dict[str, Any],
    report: EvalReport,
    decision: Decision | None = None,
    champion: EvalReport | None = None,
    *,
    base: str | None = None,
) -> str:
    """The Markdown card attached to a version: base model, data manifest, training config,
    metrics and the gate's decision. `base` overrides what the training summary says."""
    info: dict[str, Any] = {}
    path = Path(model_dir) / artifacts.TRAINING_INFO
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except ValueError:
            info = {}
    model_cfg = info.get("model") or profile.model.model_dump(mode="json")
    if base is None:
        base = model_cfg.get("base") or (
            f"fresh {model_cfg.get('arch', '?')} ({model_cfg.get('n_layer', '?')} layers, "
            f"{model_cfg.get('n_embd', '?')} wide, context {model_cfg.get('context', '?')})"
        )
        if model_cfg.get("warm_start"):
            base += "; warm-started from the champion when one existed"
    data = {k: v for k, v in manifest.items() if not isinstance(v, dict | list)}
    lines = [
        f"# {profile.registry.model_name}",
        "",
        f"- **Base model:** {base}",
        f"- **Data manifest:** `{manifest.get('content_hash', 'unknown')}`",
        "",
        "## Data",
        "",
        "```json",
        json.dumps(data, indent=2, default=str),
        "```",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(
            {"train": info.get("train"), "summary": info.get("summary")}, indent=2, default=str
        )[:2000],
        "```",
        "",
        "## Metrics (held-out documents)",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.6g} |" for k, v in report.metrics().items()]
    if decision is not None:
        lines += ["", decision.to_markdown(report, champion)]
    return "\n".join(lines) + "\n"


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/name@alias``, ``models:/name/3`` or ``models:/name/latest`` -> (name, ref)."""
    m = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+|latest))", uri.strip())
    if not m:
        raise RegistryError(
            f"'{uri}': expected models:/<name>@<alias>, models:/<name>/<version> "
            "or models:/<name>/latest"
        )
    return m.group(1), m.group(2) or m.group(3)


def resolve_model_uri(profile: Profile, uri: str) -> Path:
    """A local model directory for a registry URI (used by evaluation and warm starts)."""
    name, ref = parse_model_uri(uri)
    return Registry(profile, name=name).download(ref)
