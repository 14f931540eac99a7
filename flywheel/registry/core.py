"""`Registry`: versions, aliases and the alias history of one registered model, composed
from the pure protocol (`history`), the lock, packaging and the MLflow adapter."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from flywheel.config import MODEL_URI, Profile
from flywheel.errors import ConfigError, RegistryError
from flywheel.registry.adapter import (
    Conflict,
    MlflowAdapter,
    ModelVersionInfo,
    NotFoundError,
    version_info,
)
from flywheel.registry.history import (
    HistoryEntry,
    MoveKind,
    plan_move,
    read_history,
    require_reason,
    rollback_target,
)
from flywheel.registry.lineage import (
    ADAPTER_ARTIFACT,
    CARD_ARTIFACT,
    CHALLENGER,
    CHAMPION,
    LATEST,
    MODEL_ARTIFACT,
    REGISTERED_BY_FLYWHEEL,
    TAG_ADAPTER,
    TAG_DATA_FORMAT,
    TAG_FLAVOR,
    TAG_METHOD,
    TAG_REGISTERED_BY,
    candidate_identity,
    clip,
    training_tags,
)
from flywheel.registry.lock import alias_lock
from flywheel.registry.packaging import download as download_cached
from flywheel.registry.packaging import download_adapter, safe_name, save_mlflow_model
from flywheel.sft.render import CHATML, TEMPLATES
from flywheel.tracking import artifact_location, tracking_uri

log = logging.getLogger(__name__)


class Registry:
    """Versions, aliases and alias history of one registered model (``registry.model_name``)."""

    def __init__(self, profile: Profile, *, name: str | None = None) -> None:
        self.profile = profile
        self.cfg = profile.registry
        self.name = name or self.cfg.model_name
        self.uri = tracking_uri(profile)
        self._mlflow = MlflowAdapter(self.uri, self.cfg)

    @property
    def _client(self) -> Any:
        return self._mlflow.client

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._mlflow.call(what, fn, *args, **kwargs)

    # ------------------------------------------------------------ plumbing

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
        with suppress(Conflict):  # another process created it first
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
        return version_info(mv)

    def _experiment_id(self) -> str:
        name = self.cfg.experiment
        exp = self._call(f"read experiment {name}", self._client.get_experiment_by_name, name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(
                self._call(
                    f"create experiment {name}",
                    self._client.create_experiment,
                    name,
                    artifact_location=artifact_location(self.profile),
                )
            )
        except Conflict:
            exp = self._call(f"read experiment {name}", self._client.get_experiment_by_name, name)
            return str(exp.experiment_id)

    def _search_versions(self, filter_string: str) -> list[ModelVersionInfo]:
        out: list[ModelVersionInfo] = []
        token = None
        while True:
            page = self._call(
                f"list versions of {self.name}",
                self._client.search_model_versions,
                filter_string,
                page_token=token,
            )
            out.extend(version_info(mv) for mv in page)
            token = page.token
            if not token:
                return out

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
        out = self._search_versions(f"name='{self.name}'")
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
        return read_history(rm.tags)

    # ------------------------------------------------------------ writing

    def register_candidate(
        self,
        model_dir: Path,
        *,
        tags: dict[str, str],
        model_card: str,
        run_id: str | None = None,
        data_format: str = "text",
    ) -> str:
        """Log `model_dir` (a save_pretrained directory) as a new version with alias
        `challenger`; returns the version. The version is created with its tags, so no
        reader ever sees it without its lineage, nor without what it was trained as
        (`lineage.training_tags`: method, base, parameter counts, LoRA config).

        The version is the merged model (`model_dir` itself: what serving and the next warm
        start load, with no PEFT needed). A LoRA run's ``adapter/`` subdirectory is logged
        as the artifact ``adapter`` of the same run, its URI in the version's
        ``flywheel.adapter`` tag: one version stays one candidate (the gate, the aliases and
        their history move one thing), where a second registered model for adapters would
        need its aliases moved in step under a second lock. `data_format` (the dataset
        manifest's) picks the serving input: chat turns for instruction/chat data.
        """
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
            self._set_alias(CHALLENGER, existing)
            return existing
        own_run = run_id is None
        if run_id is None:
            run = self._call(
                "create registration run",
                self._client.create_run,
                self._experiment_id(),
                run_name=f"register-{self.name}",
                tags={"flywheel.kind": "register-candidate"},
            )
            run_id = run.info.run_id
        run = self._call(f"read run {run_id}", self._client.get_run, run_id)
        trained = training_tags(model_dir)
        with tempfile.TemporaryDirectory(prefix="flywheel-register-") as tmp:
            local = Path(tmp) / MODEL_ARTIFACT
            flavor = save_mlflow_model(
                model_dir,
                local,
                model_card,
                data_format=data_format,
                chat_template=TEMPLATES.get(self.profile.data.chat_template, CHATML),
            )
            self._call(
                f"upload model to run {run_id}",
                self._client.log_artifacts,
                run_id,
                str(local),
                MODEL_ARTIFACT,
            )
        adapter = model_dir / ADAPTER_ARTIFACT
        if (adapter / "adapter_config.json").is_file():
            self._call(
                f"upload adapter to run {run_id}",
                self._client.log_artifacts,
                run_id,
                str(adapter),
                ADAPTER_ARTIFACT,
            )
            trained[TAG_ADAPTER] = f"{run.info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT}"
        self._call("upload model card", self._client.log_text, run_id, model_card, CARD_ARTIFACT)
        if own_run:
            self._call("finish registration run", self._client.set_terminated, run_id)
        all_tags = {
            **{k: clip(str(v), 100_000) for k, v in tags.items()},
            **trained,
            TAG_DATA_FORMAT: data_format,
            TAG_FLAVOR: flavor,
            TAG_REGISTERED_BY: REGISTERED_BY_FLYWHEEL,
        }
        mv = self._call(
            f"create a version of {self.name}",
            self._client.create_model_version,
            self.name,
            f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}",
            run_id=run_id,
            tags=all_tags,
            description=clip(model_card),
        )
        version = str(mv.version)
        self._set_alias(CHALLENGER, version)
        log.info("registered %s version %s (%s flavour)", self.name, version, flavor)
        return version

    def _registered_by(self, tags: dict[str, str]) -> str | None:
        """The version already registered for this pipeline run's candidate, if any.

        A server-side tag filter (MLflow's search_model_versions supports ``tags.<key>``),
        not a scan of every version. A value holding a quote cannot be written into the
        filter safely; those (none that flywheel generates) fall back to the scan.
        """
        identity = candidate_identity(tags)
        if identity is None:
            return None  # no identity to match on: every call is a new candidate
        if any(re.search(r"['\\]", v) for v in identity.values()):
            found = [
                v.version
                for v in self.versions()
                if all(v.tags.get(k) == want for k, want in identity.items())
            ]
        else:
            terms = [f"name='{self.name}'", *(f"tags.{k}='{v}'" for k, v in identity.items())]
            found = [v.version for v in self._search_versions(" and ".join(terms))]
        return max(found, key=int) if found else None

    def _set_alias(self, alias: str, version: str) -> None:
        self._call(
            f"set alias {alias} to version {version}",
            self._client.set_registered_model_alias,
            self.name,
            alias,
            version,
        )

    def promote(
        self,
        version: str,
        *,
        reason: str,
        actor: str,
        kind: Literal["promotion", "manual"] = "promotion",
    ) -> HistoryEntry | None:
        """Make `version` the champion. `kind` is "promotion" for the gate, "manual" for a
        person. None: `version` was already the champion and nothing changed (no history
        entry), so a retried promotion succeeds."""
        return self._move(kind, reason, actor, lambda _cur, _hist: str(version))

    def rollback(self, *, to: str | None = None, reason: str, actor: str) -> HistoryEntry:
        """Move champion back: to `to`, or else to the version that was champion before it."""

        def target(current: str | None, history: list[HistoryEntry]) -> str:
            if to is not None:
                return str(to)
            if current is None:
                raise RegistryError(f"{self.name} has no champion to roll back from")
            return rollback_target(history, current, self.name)

        entry = self._move("rollback", reason, actor, target)
        assert entry is not None  # plan_move refuses a rollback onto the champion
        return entry

    def _move(
        self,
        kind: MoveKind,
        reason: str,
        actor: str,
        choose: Callable[[str | None, list[HistoryEntry]], str],
    ) -> HistoryEntry | None:
        require_reason(reason)
        with alias_lock(self._mlflow, self.name, self.cfg):
            # Read inside the lock: `from` and the next sequence number are then exact.
            rm = self._registered()
            current = rm.aliases.get(CHAMPION)
            current = str(current) if current is not None else None
            history = read_history(rm.tags)
            target = self._version(choose(current, history))
            # The number, never the word: "champion" or "latest" resolved here is what the
            # tags, the history and the alias move record (MLflow refuses a word there).
            plan = plan_move(
                name=self.name,
                kind=kind,
                reason=reason,
                actor=actor,
                current=current,
                history=history,
                to=target.version,
                to_tags=target.tags,
                now=datetime.now(UTC),
            )
            if plan is None:
                log.info("%s: version %s is already the champion", self.name, target.version)
                return None
            entry, to = plan.entry, target.version
            for key, value in plan.version_tags.items():
                self._call(
                    f"tag version {to}",
                    self._client.set_model_version_tag,
                    self.name,
                    to,
                    key,
                    value,
                )
            self._call(
                "append alias history",
                self._client.set_registered_model_tag,
                self.name,
                entry.key,
                entry.to_tag(),
            )
            try:
                self._set_alias(CHAMPION, to)
            except RegistryError as exc:
                try:
                    self._call(
                        "withdraw history entry",
                        self._client.delete_registered_model_tag,
                        self.name,
                        entry.key,
                    )
                except RegistryError:
                    raise RegistryError(
                        f"{exc}; history entry {entry.seq} records a move that did not happen"
                    ) from None
                raise
        log.info("%s: champion %s -> %s (%s by %s)", self.name, current, to, kind, actor)
        return entry

    # ------------------------------------------------------------ download

    def download(self, version_or_alias: str) -> Path:
        """A local save_pretrained directory (model + tokenizer) of a version or alias.

        Cached under the state dir by version number (a version's files never change);
        an alias is resolved first, so `download("champion")` follows the alias.
        """
        info = self._version(version_or_alias)
        cache = self.profile.state_path("registry-cache", safe_name(self.name))
        return download_cached(self._mlflow, info, cache)

    def download_adapter(self, version_or_alias: str) -> Path:
        """The LoRA adapter logged with a version (`register_candidate`), as a local PEFT
        directory (cached like `download`). NotFoundError when the version has none (a
        full fine-tune, or a version registered before adapters were logged)."""
        info = self._version(version_or_alias)
        uri = info.tags.get(TAG_ADAPTER)
        if not uri:
            method = info.tags.get(TAG_METHOD, "full")
            raise NotFoundError(
                f"{self.name} version {info.version} has no adapter (train.method {method})"
            )
        cache = self.profile.state_path("registry-cache", safe_name(self.name))
        return download_adapter(self._mlflow, info, uri, cache)


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/name@alias``, ``models:/name/3`` or ``models:/name/latest`` -> (name, ref)."""
    m = MODEL_URI.fullmatch(uri.strip())
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


def resolve_model_source(
    source: str, profile: Profile | dict[str, Any], *, field: str = "model.base"
) -> str:
    """What `from_pretrained` loads for a model source: a ``models:/`` URI becomes the local
    save_pretrained directory (merged weights + tokenizer) of that version, downloaded
    through the profile's tracking URI into the registry cache; a local path or hub id is
    returned unchanged.

    A malformed URI or a model, alias or version the registry does not hold is the
    profile's error (ConfigError naming `field`); an unreachable registry stays a
    RegistryError.
    """
    source = str(source)
    if not source.startswith("models:/"):
        return source
    if not isinstance(profile, Profile):
        profile = Profile.model_validate(profile)
    try:
        name, ref = parse_model_uri(source)
    except RegistryError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    try:
        return str(Registry(profile, name=name).download(ref))
    except NotFoundError as exc:
        raise ConfigError(f"{field}: {source}: {exc}") from None
