"""A tiny prepared Dataset built in code, in the layout of `flywheel.artifacts`.

Stand-in for the output of the data stage, so training tests do not depend on it: real
text (the pydoc topics shipped with the interpreter), a byte-level BPE trained here with
`tokenizers`, packed into blocks of exactly `block_size` tokens. Built in about a second.

    from tests.fixtures_data import build_dataset
    build_dataset(tmp_path / "ds", block_size=32, vocab_size=512)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel import artifacts


def pydoc_texts(max_docs: int | None = None) -> list[str]:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    return texts[:max_docs] if max_docs else texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _pack(ids: list[list[int]], eos: int, block_size: int) -> np.ndarray:
    flat = np.fromiter((t for doc in ids for t in [*doc, eos]), dtype=np.int32)
    n = len(flat) // block_size
    return flat[: n * block_size].reshape(n, block_size)


def _write_split(dirpath: Path, blocks: np.ndarray, shards: int) -> None:
    dirpath.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(blocks, max(1, shards))):
        col = pa.array(list(part), type=pa.list_(pa.int32()))
        pq.write_table(pa.table({artifacts.TOKEN_COLUMN: col}), dirpath / f"part-{i:05d}.parquet")


def build_dataset(
    out: Path,
    *,
    block_size: int = 32,
    vocab_size: int = 512,
    max_docs: int | None = None,
    max_train_blocks: int | None = None,
    shards: int = 2,
) -> Path:
    """Write a Dataset artifact at `out` and return it. Deterministic for given arguments."""
    out = Path(out)
    texts = pydoc_texts(max_docs)
    tok = train_tokenizer(texts, vocab_size)
    tok.save_pretrained(out / artifacts.TOKENIZER_DIR)
    # Every 20th document goes to validation, the next to test: a fixed, salt-free split.
    splits: dict[str, list[str]] = {s: [] for s in artifacts.SPLITS}
    for i, text in enumerate(texts):
        splits["validation" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].append(text)
    digest = hashlib.sha256()
    counts: dict[str, int] = {}
    nblocks: dict[str, int] = {}
    for split, docs in splits.items():
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        blocks = _pack(ids, tok.eos_token_id, block_size)
        if split == "train" and max_train_blocks:
            blocks = blocks[:max_train_blocks]
        _write_split(out / split, blocks, shards if split == "train" else 1)
        digest.update(blocks.tobytes())
        counts[split] = int(blocks.size)
        nblocks[split] = len(blocks)
    manifest = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "content_hash": digest.hexdigest(),
        "block_size": block_size,
        "vocab_size": len(tok),
        "tokens": counts,
        "sequences": nblocks,
        "fixture": "tests/fixtures_data.py",
    }
    (out / artifacts.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


# Overrides that make configs/local.yaml tiny enough for the integration tier.
# The smallest model the fixture datasets train (block_size 32), for tests that run Ray Train.
TINY_MODEL = (
    "data.block_size=32",
    "model.context=32",
    "model.n_embd=32",
    "model.n_head=2",
    "model.n_layer=2",
    "train.micro_batch_size=4",
)


def tiny_steps(max_steps: int, checkpoint_every: int, log_every: int, warmup: int = 2) -> list[str]:
    """The step schedule of a tiny training run, as overrides."""
    return [
        f"train.max_steps={max_steps}",
        f"train.warmup_steps={warmup}",
        f"train.checkpoint_every={checkpoint_every}",
        f"train.log_every={log_every}",
    ]


TINY_OVERRIDES = (
    "data.source.max_docs=400",
    "data.tokenizer.vocab_size=512",
    "data.block_size=32",
    "model.context=32",
    "model.n_embd=32",
    "train.max_steps=12",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.checkpoint_every=6",
    "tune.n_trials=2",
    "tune.trial_steps=4",
    "eval.max_docs=40",
    "eval.bootstrap_samples=50",
)
