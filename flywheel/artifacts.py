"""Layouts of the typed artifacts that pass between stages.

One place names the files, so a stage never guesses another stage's layout.

Dataset (output of prepare-data)::

    manifest.json              counts, hashes, token counts, schema version (see DatasetManifest)
    train/part-*.parquet       column input_ids: list<int32>, each exactly data.block_size tokens
    validation/part-*.parquet  same
    test/part-*.parquet        same
    text/test.parquet          held-out documents: id, source, timestamp, text (evaluation
                               re-tokenizes them with each model's own tokenizer)
    text/reference.parquet     a sample of train documents (the drift reference)
    tokenizer/                 a Hugging Face tokenizer (save_pretrained)
    rejects.jsonl              one line per rejected row: id, source, reason, detail

Model (output of train)::

    config.json, model.safetensors, tokenizer files   (save_pretrained: from_pretrained loads it)
    flywheel_training.json     the train/model config and the summary of the run
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:  # both import this module: at run time they would be a cycle
    from flywheel.config import DataConfig
    from flywheel.data.stats import DataStats

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")
TEXT_DIR = "text"
TEST_TEXT = "text/test.parquet"
REFERENCE_TEXT = "text/reference.parquet"
TOKENIZER_DIR = "tokenizer"
REJECTS = "rejects.jsonl"
TOKEN_COLUMN = "input_ids"
LABEL_COLUMN = "labels"  # SFT samples: input_ids with -100 where no loss is taken

TRAINING_INFO = "flywheel_training.json"


class _Part(BaseModel):
    """A nested manifest entry: fields the writer adds ahead of this model are kept."""

    model_config = ConfigDict(extra="allow")


class SplitEntry(_Part):
    docs: int = 0
    tokens: int = 0
    sequences: int = 0  # packed training sequences of block_size tokens
    tail_tokens: int = 0
    files: list[str] = Field(default_factory=list, description="shards, relative to the dataset")


class TokenizerEntry(_Part):
    path: str = TOKENIZER_DIR
    trained: bool = False
    base: str | None = None
    vocab_size: int | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


class TextEntry(_Part):
    test: str = TEST_TEXT
    test_docs: int = 0
    reference: str = REFERENCE_TEXT
    reference_docs: int = 0


class StepCount(_Part):
    name: str
    read: int
    kept: int
    dropped: dict[str, int] = Field(default_factory=dict, description="reason -> documents")


class Counts(_Part):
    read: int = 0
    rejected: int = 0
    kept: int = 0
    steps: list[StepCount] = Field(default_factory=list, description="in pipeline order")


class Rejects(_Part):
    file: str = REJECTS
    by_reason: dict[str, int] = Field(default_factory=dict)
    by_source: dict[str, int] = Field(default_factory=dict)


class Dropped(_Part):
    file: str = ""
    by_step: dict[str, int] = Field(default_factory=dict)
    by_reason: dict[str, int] = Field(default_factory=dict, description="'step:reason' -> docs")


class DatasetManifest(_Part):
    """`manifest.json`: what the data stage made, read by every stage that takes a dataset.

    Only `schema_version` and `content_hash` are required: they identify a dataset (the
    gate's lineage, the tune study's name, evaluation's pairing); the rest describes it.
    Unknown fields are kept, so a reader that rewrites the manifest (`record_source`) never
    drops what a newer writer added.
    """

    schema_version: int
    content_hash: str = Field(description="sha256 of the inputs and the data config")
    # What a row of the splits is; readers branch on it (evaluation, the demo, training).
    # Manifests written before the field existed are raw text, hence the default.
    format: Literal["text", "instruction", "chat"] = Field(
        "text",
        description="text: packed block_size sequences of raw text; instruction / chat: one "
        "loss-masked SFT sample per row (input_ids + labels, unpadded)",
    )
    pipeline_version: int | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="the data config (JSON)")
    block_size: int | None = None
    token_column: str = TOKEN_COLUMN
    vocab_size: int | None = None
    # Flat per-split totals (the same numbers as under `splits`) for quick readers.
    docs: dict[str, int] = Field(default_factory=dict)
    tokens: dict[str, int] = Field(default_factory=dict)
    sequences: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, SplitEntry] = Field(default_factory=dict)
    tokenizer: TokenizerEntry = Field(default_factory=TokenizerEntry)
    text: TextEntry = Field(default_factory=TextEntry)
    counts: Counts = Field(default_factory=Counts)
    rejects: Rejects = Field(default_factory=Rejects)
    dropped: Dropped = Field(default_factory=Dropped)

    @classmethod
    def read(cls, dataset_dir: str | Path) -> DatasetManifest:
        """The manifest of a prepared dataset, or a DataError naming the file (and the
        dotted field when one is malformed)."""
        from flywheel.errors import DataError

        path = Path(dataset_dir) / MANIFEST
        if not path.is_file():
            raise DataError(f"{dataset_dir}: not a prepared dataset (no {MANIFEST})")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{path}: not a dataset manifest (a JSON object)")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise DataError(
                f"{path}: schema_version {raw.get('schema_version')} != {SCHEMA_VERSION}; "
                "prepare the data again"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise DataError(f"{path}: {where}: {first['msg']}") from None

    def write(self, dataset_dir: str | Path) -> Path:
        """Write `manifest.json` (sorted keys: the same dataset gives the same bytes)."""
        path = Path(dataset_dir) / MANIFEST
        data = self.model_dump(mode="json")
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path


def dataset_manifest(
    cfg: DataConfig,
    stats: DataStats,
    *,
    pipeline_version: int,
    splits: dict,
    tok_info: dict,
    tokenizer: dict,
    text: dict,
    steps: list,
    **extra: Any,
) -> dict[str, Any]:
    """The fields of `manifest.json` every data stage writes (raw text and SFT alike), from
    its config and stats; `tokenizer` adds to the tokenizer entry (where its base came from),
    `extra` adds top-level fields (`dropped`, `format`, `sft`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": pipeline_version,
        "content_hash": stats.content_hash,
        "config": cfg.model_dump(mode="json"),
        "block_size": cfg.block_size,
        "token_column": TOKEN_COLUMN,
        # Flat per-split totals (the same numbers as under `splits`) for quick readers.
        "vocab_size": tok_info["vocab_size"],
        "docs": stats.docs,
        "tokens": stats.tokens,
        "sequences": stats.sequences,
        "splits": splits,
        "tokenizer": {
            "path": TOKENIZER_DIR,
            "trained": stats.tokenizer_trained,
            **tokenizer,
            **tok_info,
        },
        "text": text,
        "counts": {
            "read": stats.docs_read,
            "rejected": stats.rejected_total,
            "kept": stats.docs_kept,
            "steps": steps,
        },
        "rejects": {
            "file": REJECTS,
            "by_reason": stats.rejected,
            "by_source": stats.rejected_by_source,
        },
        **extra,
    }


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The manifest as plain JSON data (`DatasetManifest.read`, dumped), for dict readers."""
    return DatasetManifest.read(dataset_dir).model_dump(mode="json")


def split_files(dataset_dir: str | Path, split: str) -> list[Path]:
    return sorted((Path(dataset_dir) / split).glob("*.parquet"))


class JsonFile(BaseModel):
    """A pydantic model that travels between steps as one JSON file (reports, decisions).

    `load` fails with a DataError naming the file, so a step handed the wrong artifact says
    which one instead of raising a pydantic traceback.
    """

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.model_validate_json(text)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        from flywheel.errors import DataError

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: {cls.__name__} not found")
        try:
            return cls.from_json(path.read_text())
        except ValueError as exc:
            raise DataError(f"{path}: not a {cls.__name__} ({exc})") from None


J = TypeVar("J", bound=JsonFile)

# The stand-in for a report whose subject does not exist (no champion to evaluate): KFP
# needs every declared output written, and a reader must tell "none" from a lost file.
ABSENT: dict[str, bool] = {"absent": True}


def write_absent(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ABSENT))
    return path


def load_unless_absent(cls: type[J], path: str | Path) -> J | None:
    """`cls.load(path)`, or None where `write_absent` wrote the file."""
    path = Path(path)
    try:
        if json.loads(path.read_text()) == ABSENT:
            return None
    except (OSError, ValueError):
        pass  # missing or not JSON: `load` says which, naming the file
    return cls.load(path)
