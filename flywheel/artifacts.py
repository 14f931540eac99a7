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
from typing import Any, Self

from pydantic import BaseModel

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")
TEXT_DIR = "text"
TEST_TEXT = "text/test.parquet"
REFERENCE_TEXT = "text/reference.parquet"
TOKENIZER_DIR = "tokenizer"
REJECTS = "rejects.jsonl"
TOKEN_COLUMN = "input_ids"

TRAINING_INFO = "flywheel_training.json"


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    from flywheel.errors import DataError

    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{dataset_dir}: not a prepared dataset (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}; "
            "prepare the data again"
        )
    return manifest


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
