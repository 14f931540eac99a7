"""Everything decided before a worker starts: batch arithmetic, DeepSpeed config, data checks,
and the resources a stage asks of Ray (`train_resources`, `tune_resources`, `check_resources`).

Pure functions over the profile, the DeepSpeed JSON and the dataset's metadata (parquet
footers, manifest, tokenizer config; no tensors). `make_plan` either returns a `TrainPlan`
that the workers execute as is, or raises a `ConfigError`/`DataError` that names the file
and the field, so a bad input costs a second instead of a Ray + DeepSpeed start-up.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from flywheel import artifacts
from flywheel.config import Profile, config_file
from flywheel.errors import ConfigError, DataError
from flywheel.runtime import RayResources

# The profile owns these DeepSpeed keys; the JSON may omit them, repeat the same value, or
# say "auto" (the Hugging Face convention), but never disagree.
_OWNED_KEYS = (
    ("train_batch_size", "train.global_batch_size (micro x accum x workers)"),
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("gradient_clipping", "train.grad_clip"),
    ("zero_optimization.stage", "train.zero_stage"),
    ("bf16.enabled", "train.precision"),
    ("fp16.enabled", "train.precision (fp16 is not offered: bf16 or fp32)"),
)
DEFAULT_ZERO_STAGE = 2
PACKAGED_DEEPSPEED = "configs/deepspeed/zero{stage}.json"
# The optimizer and schedule are built in code from the profile (torch AdamW + LambdaLR):
# DeepSpeed's own Adam on CPU needs a JIT-compiled C++ op, torch's runs everywhere.
_FORBIDDEN_SECTIONS = {
    "optimizer": "train.lr / train.weight_decay",
    "scheduler": "train.lr_schedule",
}


class DatasetInfo(BaseModel):
    path: str
    train_files: list[str]
    train_blocks: int
    """Rows of the train split: packed blocks (text) or samples (instruction / chat)."""
    block_size: int
    """Tokens per block (text), or the most a sample may hold (instruction / chat)."""
    vocab_size: int
    content_hash: str | None
    eos_token_id: int | None
    pad_token_id: int | None
    format: Literal["text", "instruction", "chat"] = "text"
    sample_tokens: int | None = None
    """Real (unpadded) tokens in the train split's samples (instruction / chat)."""

    @property
    def is_sft(self) -> bool:
        return self.format != "text"

    @property
    def train_tokens(self) -> int:
        if self.sample_tokens is not None:
            return self.sample_tokens
        return self.train_blocks * self.block_size

    @property
    def mean_row_tokens(self) -> float:
        return self.train_tokens / self.train_blocks if self.train_blocks else 0.0


class ModelSource(BaseModel):
    """Where the weights come from: a directory or hub id, or a fresh model (None)."""

    kind: Literal["init_from", "base", "fresh"]
    path: str | None = None


class TrainPlan(BaseModel):
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    max_steps: int
    precision: Literal["fp32", "bf16"]
    backend: Literal["gloo", "nccl"]
    deepspeed_config_path: str
    deepspeed: dict[str, Any]
    zero_stage: int
    """The stage run: train.zero_stage's, or the one in your own train.deepspeed_config."""
    model_source: ModelSource
    dataset: DatasetInfo
    tokenizer_matches_model: bool | None = None
    """For a model from a directory: does its tokenizer equal the dataset's? (None: unknown)"""

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on: exact for packed blocks; for SFT samples the
        expected count (their mean length; the loop counts each step's real tokens)."""
        if self.dataset.is_sft:
            return round(self.global_batch * self.dataset.mean_row_tokens)
        return self.global_batch * self.dataset.block_size


# ------------------------------------------------------------------ pure pieces


def batch_sizes(profile: Profile) -> tuple[int, int, int, int]:
    """(micro, accum, world, global) with micro x accum x world = global, or ConfigError."""
    t = profile.train
    world = t.scaling.num_workers
    derived = t.micro_batch_size * t.grad_accum * world
    if t.global_batch_size is not None and t.global_batch_size != derived:
        # The profile validator checks this too; repeated for profiles built in code.
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) != micro_batch_size "
            f"({t.micro_batch_size}) x grad_accum ({t.grad_accum}) x scaling.num_workers ({world})"
        )
    return t.micro_batch_size, t.grad_accum, world, derived


def precision(profile: Profile) -> Literal["fp32", "bf16"]:
    p = profile.train.precision
    if p == "auto":
        return "bf16" if profile.train.scaling.use_gpu else "fp32"
    return p


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = d
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def deepspeed_config(profile: Profile, raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Fill the profile's values into a DeepSpeed JSON; a contradiction is a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object")
    for section, owner in _FORBIDDEN_SECTIONS.items():
        if section in raw:
            raise ConfigError(f"{source}: remove '{section}'; the profile sets it ({owner})")
    micro, accum, _world, global_batch = batch_sizes(profile)
    prec = precision(profile)
    wanted = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": profile.train.grad_clip,
        "zero_optimization.stage": zero_stage(profile, raw, source),
        "bf16.enabled": prec == "bf16",
        "fp16.enabled": False,
    }
    cfg = copy.deepcopy(raw)
    for key, owner in _OWNED_KEYS:
        have, want = _get(cfg, key), wanted[key]
        if have is not None and have != "auto" and have != want:
            raise ConfigError(
                f"{source}: {key} = {json.dumps(have)} contradicts the profile "
                f"({owner} gives {json.dumps(want)})"
            )
        _set(cfg, key, want)
    return cfg


def zero_stage(profile: Profile, raw: dict[str, Any], source: str) -> int:
    """train.zero_stage (unset: 2), or the stage your own train.deepspeed_config sets
    (DeepSpeed's default, 0, when it sets none)."""
    t = profile.train
    if t.deepspeed_config is None:
        return DEFAULT_ZERO_STAGE if t.zero_stage is None else t.zero_stage
    stage = _get(raw, "zero_optimization.stage")
    if stage is None:
        return 0
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


def load_deepspeed_json(profile: Profile) -> tuple[dict[str, Any], str]:
    """Your own train.deepspeed_config, else the packaged JSON train.zero_stage picks."""
    t = profile.train
    if t.deepspeed_config is not None:
        field, path = "train.deepspeed_config", config_file(t.deepspeed_config)
    else:
        stage = DEFAULT_ZERO_STAGE if t.zero_stage is None else t.zero_stage
        field, path = "train.zero_stage", config_file(PACKAGED_DEEPSPEED.format(stage=stage))
    if not path.is_file():
        raise ConfigError(f"{field}: {path} not found")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def lr_factor(
    step: int, *, warmup: int, max_steps: int, schedule: str, floor: float = 0.1
) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then the schedule.

    Decays to `floor` x peak rather than 0 (as nanoGPT/Chinchilla do): the last steps
    still learn, and a continued run (`resume_from`) does not start from a dead LR.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- dataset checks


def inspect_dataset(dataset_dir: str | Path) -> DatasetInfo:
    """Read the dataset's metadata (manifest, parquet footers, tokenizer) or DataError."""
    import pyarrow.parquet as pq

    root = Path(dataset_dir)
    manifest = artifacts.DatasetManifest.read(root)
    files = artifacts.split_files(root, "train")
    if not files:
        raise DataError(f"{root / 'train'}: no parquet shards")
    sft = manifest.format != "text"
    # SFT rows are unpadded samples with their labels; text rows are block_size tokens.
    columns = [artifacts.TOKEN_COLUMN, *([artifacts.LABEL_COLUMN] if sft else [])]
    blocks = 0
    width: int | None = None
    for f in files:
        meta = pq.ParquetFile(f)
        for column in columns:
            if column not in meta.schema_arrow.names:
                raise DataError(f"{f}: no column '{column}' ({manifest.format} dataset)")
        blocks += meta.metadata.num_rows
        if not sft and width is None and meta.metadata.num_rows:
            first = meta.read_row_group(0, columns=[artifacts.TOKEN_COLUMN]).column(0)[0]
            width = len(first)
    block_size = int(manifest.block_size or width or 0)
    if width is not None and width != block_size:
        raise DataError(f"{root}: manifest block_size {block_size} but shards hold {width} tokens")
    tok_dir = root / artifacts.TOKENIZER_DIR
    vocab, eos, pad = _tokenizer_meta(tok_dir)
    return DatasetInfo(
        path=str(root.resolve()),
        train_files=[str(f.resolve()) for f in files],
        train_blocks=blocks,
        block_size=block_size,
        vocab_size=vocab,
        content_hash=manifest.content_hash,
        eos_token_id=eos,
        pad_token_id=pad,
        format=manifest.format,
        sample_tokens=manifest.tokens.get("train") if sft else None,
    )


def _tokenizer_meta(tok_dir: Path) -> tuple[int, int | None, int | None]:
    if (
        not (tok_dir / "tokenizer.json").is_file()
        and not (tok_dir / "tokenizer_config.json").is_file()
    ):
        raise DataError(f"{tok_dir}: no tokenizer (expected a save_pretrained directory)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return len(tok), tok.eos_token_id, tok.pad_token_id


# ---------------------------------------------------------------- model checks


def _model_source(profile: Profile, init_from: str | None) -> ModelSource:
    if init_from:
        if not Path(init_from).is_dir():
            raise ConfigError(f"init_from: {init_from} is not a model directory")
        return ModelSource(kind="init_from", path=str(Path(init_from).resolve()))
    if profile.model.base:
        from flywheel.registry import resolve_model_source

        # models:/<name>@<alias> is the registry version's merged save_pretrained directory
        # (downloaded into the registry cache); a path or hub id passes unchanged.
        return ModelSource(kind="base", path=resolve_model_source(profile.model.base, profile))
    return ModelSource(kind="fresh")


def _check_adapters(profile: Profile, source: ModelSource, data: DatasetInfo) -> None:
    """LoRA's target modules (on a meta-device model) and QLoRA's device, before Ray starts."""
    from transformers import AutoConfig

    from flywheel.sft import lora
    from flywheel.train.model import fresh_config

    lora.check_method_here(profile.train)
    if source.kind == "fresh":
        cfg = fresh_config(profile.model, data)
    else:  # _check_model has loaded this config once already
        cfg = AutoConfig.from_pretrained(str(source.path))
    lora.check_targets(profile.train.lora, cfg)


def _check_model(profile: Profile, source: ModelSource, data: DatasetInfo) -> None:
    m = profile.model
    if source.kind == "fresh":
        if m.n_embd % m.n_head:
            raise ConfigError(
                f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})"
            )
        if m.arch == "llama" and (m.n_embd // m.n_head) % 2:
            raise ConfigError(
                f"model.n_embd / model.n_head = {m.n_embd // m.n_head}: llama's rotary "
                "embeddings need an even head width"
            )
        if data.block_size > m.context:
            raise ConfigError(
                f"dataset block_size ({data.block_size}) exceeds model.context ({m.context})"
            )
        return
    from transformers import AutoConfig

    field = "init_from" if source.kind == "init_from" else "model.base"
    from flywheel.data import hub

    # A hub id without a network: one bounded request and one line, not ~25 s of retries.
    can = hub.access(str(source.path))
    if can.problem:
        raise ConfigError(f"{field}: cannot load a model config from {source.path}: {can.problem}")
    try:
        cfg = AutoConfig.from_pretrained(str(source.path), local_files_only=can.local_only)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{field}: cannot load a model config from {source.path} ({exc})"
        ) from None
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is not None and vocab < data.vocab_size:
        raise ConfigError(
            f"{field}: the model's vocabulary ({vocab}) is smaller than the dataset tokenizer's "
            f"({data.vocab_size}); prepare the data with this model's tokenizer"
        )
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if positions is not None and data.block_size > positions:
        raise ConfigError(
            f"{field}: dataset block_size ({data.block_size}) exceeds the model's {positions} positions"
        )


def tokenizer_matches(model_dir: str | Path, dataset_dir: str | Path) -> bool | None:
    """Whether a model directory's tokenizer has the dataset tokenizer's vocabulary.

    A warm start on data tokenized by a different BPE trains on token ids that mean other
    strings to the starting weights: it runs, but starts from a scrambled model. None when
    either side has no tokenizer.json to compare.
    """
    a = Path(model_dir) / "tokenizer.json"
    b = Path(dataset_dir) / artifacts.TOKENIZER_DIR / "tokenizer.json"
    if not (a.is_file() and b.is_file()):
        return None
    vocab = [json.loads(f.read_text()).get("model", {}).get("vocab") for f in (a, b)]
    return vocab[0] == vocab[1]


# -------------------------------------------------------------------- resources

# Ray Train v2 runs its controller as a 0-CPU actor (and a tuning trial's driver asks only for
# memory, flywheel.tune.study), so a stage needs its workers' resources and nothing more.
TRAINER_CPUS = 0.0


@dataclass(frozen=True)
class ResourceAsk:
    """What one stage asks of Ray at once: `count` equal bundles (+ the trainer's own CPUs),
    with the profile fields that decide each number, for messages."""

    count: int
    cpus_each: float
    gpus_each: float
    cpu_fields: str  # e.g. "train.scaling.num_workers=4 x cpus_per_worker=1"
    gpu_fields: str = ""
    cpus_extra: float = TRAINER_CPUS

    @property
    def cpus(self) -> float:
        return self.count * self.cpus_each + self.cpus_extra

    @property
    def gpus(self) -> float:
        return self.count * self.gpus_each

    def bundles(self) -> list[dict[str, float]]:
        one = {"CPU": self.cpus_each} | ({"GPU": self.gpus_each} if self.gpus_each else {})
        return [dict(one) for _ in range(self.count)]

    def problems(self, available: RayResources) -> list[str]:
        return check_resources(self, available)


def _n(x: float, unit: str) -> str:
    return f"{x:g} {unit}" + ("" if x == 1 else "s")


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def check_resources(asked: ResourceAsk, available: RayResources) -> list[str]:
    """Why `asked` cannot run on `available`, one sentence per reason naming the fields; [] if it fits.

    Pure. Totals first (the usual mistake: more workers than CPUs), then one bundle against
    the largest node (a worker cannot span nodes).
    """
    out: list[str] = []
    where = available.where
    if asked.cpus > available.cpus:
        out.append(
            f"{asked.cpu_fields} needs {_n(asked.cpus, 'CPU')}; {where} has "
            f"{available.cpus:g}{_note(available.cpu_note)}"
        )
    elif asked.count and asked.cpus_each > available.node_cpus:
        out.append(
            f"{asked.cpu_fields}: one worker needs {_n(asked.cpus_each, 'CPU')}; the largest "
            f"node of {where} has {available.node_cpus:g}"
        )
    if asked.gpus > available.gpus:
        out.append(
            f"{asked.gpu_fields} needs {_n(asked.gpus, 'GPU')}; {where} has "
            f"{available.gpus:g}{_note(available.gpu_note)}"
        )
    elif asked.gpus_each > available.node_gpus:
        out.append(
            f"{asked.gpu_fields}: one worker needs {_n(asked.gpus_each, 'GPU')}; the largest "
            f"node of {where} has {available.node_gpus:g}"
        )
    return out


def train_resources(profile: Profile) -> ResourceAsk:
    """The training stage: `num_workers` workers of `cpus_per_worker` (+ GPUs with use_gpu)."""
    s = profile.train.scaling
    gpus = s.gpus_per_worker if s.use_gpu else 0.0
    return ResourceAsk(
        count=s.num_workers,
        cpus_each=s.cpus_per_worker,
        gpus_each=gpus,
        cpu_fields=f"train.scaling.num_workers={s.num_workers} x cpus_per_worker={s.cpus_per_worker:g}",
        gpu_fields=(
            f"train.scaling.use_gpu=true with num_workers={s.num_workers} x "
            f"gpus_per_worker={s.gpus_per_worker:g}"
        ),
    )


def tune_resources(profile: Profile) -> ResourceAsk:
    """The tuning stage: `tune.parallel` trials at once, each one worker of the training shape
    (flywheel.tune.space.trial_profile trains a trial on a single worker)."""
    s, parallel = profile.train.scaling, profile.tune.parallel
    gpus = s.gpus_per_worker if s.use_gpu else 0.0
    return ResourceAsk(
        count=parallel,
        cpus_each=s.cpus_per_worker,
        gpus_each=gpus,
        cpu_fields=(
            f"tune.parallel={parallel} trials x train.scaling.cpus_per_worker={s.cpus_per_worker:g}"
        ),
        gpu_fields=(
            f"tune.parallel={parallel} trials x train.scaling.gpus_per_worker="
            f"{s.gpus_per_worker:g} (use_gpu=true)"
        ),
    )


# ---------------------------------------------------------------------- the plan


def make_plan(profile: Profile, dataset_dir: str | Path, init_from: str | None = None) -> TrainPlan:
    """Check everything checkable before Ray starts; return what the workers will do."""
    micro, accum, world, global_batch = batch_sizes(profile)
    raw, source = load_deepspeed_json(profile)
    ds = deepspeed_config(profile, raw, source)
    data = inspect_dataset(dataset_dir)
    if data.is_sft and data.train_blocks < global_batch:
        raise DataError(
            f"{dataset_dir}: {data.train_blocks} training samples is fewer than one global "
            f"batch of {global_batch}; lower train.micro_batch_size / grad_accum / "
            "scaling.num_workers or prepare more records"
        )
    if data.train_blocks < global_batch:
        raise DataError(
            f"{dataset_dir}: {data.train_tokens:,} training tokens ({data.train_blocks} blocks of "
            f"{data.block_size}) is fewer than one global batch of {global_batch} blocks "
            f"({global_batch * data.block_size:,} tokens); lower train.micro_batch_size / "
            "grad_accum / scaling.num_workers or prepare more data"
        )
    model_source = _model_source(profile, init_from)
    _check_model(profile, model_source, data)
    if profile.train.method != "full":
        _check_adapters(profile, model_source, data)
    prec = precision(profile)
    matches = None
    if model_source.kind != "fresh" and Path(str(model_source.path)).is_dir():
        matches = tokenizer_matches(str(model_source.path), dataset_dir)
    return TrainPlan(
        world_size=world,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=global_batch,
        max_steps=profile.train.max_steps,
        precision=prec,
        backend="nccl" if profile.train.scaling.use_gpu else "gloo",
        deepspeed_config_path=source,
        deepspeed=ds,
        zero_stage=ds["zero_optimization"]["stage"],
        model_source=model_source,
        dataset=data,
        tokenizer_matches_model=matches,
    )
