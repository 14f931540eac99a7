"""Packing and writing, inside Ray: token shards and the one-file reports.

Packing concatenates each split's documents in content-key order, `doc EOS doc EOS ...`,
and cuts the stream into sequences of `data.block_size` tokens; the tail shorter than one
sequence is dropped (counted as `tail_tokens`). Here that runs as one Ray task per shard,
never on the driver:

1. every tokenized document falls in one of `KEY_PARTS` ranges of its content key (the
   key is a hash, so the ranges are even); the driver adds up tokens per range, streamed
   batch by batch (a fixed-size array, whatever the corpus);
2. `plan_shards` cuts each split's ranges into shards of about `SEQUENCES_PER_SHARD`
   sequences and knows, from the counts alone, the stream offset where each shard starts;
3. a groupby on (split, shard) hands each shard its own documents plus the first documents
   of the next ranges ("lookahead", at least one sequence's worth), so the sequence that
   straddles two shards is completed by the shard it starts in;
4. each shard task encodes `part-<shard>.parquet` itself and returns its bytes, which the
   driver writes (`gather_files`: on a cluster the task runs on another node, whose disk
   neither the driver nor the step that uploads the dataset ever sees).

What bounds memory: on the driver, the per-range counts; in a task, one shard's documents
(~`SEQUENCES_PER_SHARD` x `block_size` tokens) and its lookahead. The shards depend only
on the documents and the config (never on batches, tasks or arrival order), so the same
input gives the same bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel import artifacts
from flywheel.data import schema

SEQUENCES_PER_SHARD = 8192  # 8192 x 128 tokens x 4 bytes = 4 MiB before compression
KEY_HEX = 4  # key ranges by the first 4 hex digits of the content key
KEY_PARTS = 16**KEY_HEX
TEXT_ROWS_PER_GROUP = 1024  # parquet row groups of the text files: fixed, so bytes repeat


def key_part(keys: pd.Series | list[str]) -> np.ndarray:
    """The key range (0 .. KEY_PARTS-1) of each content key."""
    return np.array([int(k[:KEY_HEX], 16) for k in keys], dtype=np.int64)


# ------------------------------------------------------------------------- plan


@dataclass
class SplitPlan:
    """Where each key range of one split goes; built from token counts alone."""

    shard_of: np.ndarray  # key range -> shard
    starts: list[int]  # stream offset (tokens, EOS included) of each shard's first token
    lengths: list[int]  # tokens of each shard's own documents
    lookahead: list[tuple[int, int]] = field(default_factory=list)  # shard -> ranges [a, b)

    @property
    def total(self) -> int:
        return sum(self.lengths)


def plan_shards(tokens: np.ndarray, seq_len: int, per_shard: int | None = None) -> SplitPlan:
    """Cut key ranges (`tokens[i]`: stream tokens of range i) into consecutive shards.

    A shard closes once it holds `per_shard` sequences' worth of tokens; a remainder of less
    than half a shard joins the shard before it. Each shard but the last reads, as
    lookahead, the ranges after its own until they hold `seq_len - 1` tokens: enough to
    finish any sequence that starts inside it.
    """
    target = (per_shard or SEQUENCES_PER_SHARD) * seq_len
    shard_of = np.zeros(len(tokens), dtype=np.int64)
    bounds = [0]  # first range of each shard
    acc = 0
    for i, t in enumerate(tokens):
        if acc >= target:
            bounds.append(i)
            acc = 0
        acc += int(t)
    if len(bounds) > 1 and acc < target // 2:
        bounds.pop()
    bounds.append(len(tokens))
    cum = np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)])
    starts, lengths, lookahead = [], [], []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        shard_of[a:b] = k
        starts.append(int(cum[a]))
        lengths.append(int(cum[b] - cum[a]))
        # The first range after b where the cumulative tokens past the shard reach seq_len - 1.
        need = cum[b] + seq_len - 1
        end = int(np.searchsorted(cum, need, side="left"))
        lookahead.append((b, min(max(end, b), len(tokens))))
    return SplitPlan(shard_of, starts, lengths, lookahead)


class AssignShards(schema.Step):
    """`shard` (and `lookahead`) per tokenized document; a document that another shard
    needs as lookahead is emitted once more for that shard."""

    row_wise = False

    def __init__(self, plans: dict[str, SplitPlan]):
        self.plans = plans

    def __call__(self, batch: pa.Table) -> pa.Table:  # type: ignore[override]
        parts = key_part(batch["key"].to_pylist())
        splits = np.asarray(batch["split"].to_pylist(), dtype=object)
        shard = np.zeros(len(parts), dtype=np.int64)
        pieces = []
        for split, plan in self.plans.items():
            mine = splits == split
            shard[mine] = plan.shard_of[parts[mine]]
            for k, (a, b) in enumerate(plan.lookahead):
                ahead = np.flatnonzero(mine & (parts >= a) & (parts < b))
                if len(ahead):
                    extra = batch.take(pa.array(ahead))
                    pieces.append(
                        extra.append_column(
                            "shard", pa.array(np.full(len(ahead), k))
                        ).append_column("lookahead", pa.array(np.ones(len(ahead), dtype=bool)))
                    )
        own = batch.append_column("shard", pa.array(shard)).append_column(
            "lookahead", pa.array(np.zeros(len(parts), dtype=bool))
        )
        return pa.concat_tables([own, *pieces])


def stream_with_eos(ids: pa.Array, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(all ids with EOS after each document, stream length of each document)."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    values = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int32)
    out = np.empty(len(values) + len(lengths), dtype=np.int32)
    ends = np.cumsum(lengths) - 1
    keep = np.ones(len(out), dtype=bool)
    keep[ends] = False
    out[keep] = values
    out[ends] = eos_id
    return out, lengths


def sequences_bytes(seqs: np.ndarray) -> bytes:
    """One shard: column `input_ids` (list<int32>), one row per sequence, one row group."""
    n, size = seqs.shape
    offsets = pa.array(np.arange(0, (n + 1) * size, size, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(seqs.reshape(-1), type=pa.int32()))
    return parquet_bytes(pa.table({artifacts.TOKEN_COLUMN: column}), compression="zstd")


def write_sequences(seqs: np.ndarray, path: Path) -> None:
    _write(path, sequences_bytes(seqs))


# ------------------------------------------------------------ files to the driver

# What a task that makes a file returns: the file's name relative to the dataset directory,
# its bytes, and its counts. A Ray task never writes into the driver's directory.
FILE_COLUMN = "file"
DATA_COLUMN = "data"


def parquet_bytes(table: pa.Table, **options) -> bytes:
    """`table` as a Parquet file's bytes (the same bytes pq.write_table writes to a path)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def file_result(name: str, data: bytes, **counts: object) -> pd.DataFrame:
    """A file-making task's one result row."""
    return pd.DataFrame(
        {FILE_COLUMN: [name], DATA_COLUMN: [data], **{k: [v] for k, v in counts.items()}}
    )


def gather_files(results, out_dir: Path) -> pd.DataFrame:
    """Write the files a Ray Dataset of `file_result` rows carries into `out_dir`, one at a
    time as the tasks finish (the driver holds one file, never the dataset); returns the rows
    without their bytes."""
    rows = []
    for batch in results.iter_batches(batch_size=1, batch_format="pandas", prefetch_batches=0):
        for name, data in zip(batch[FILE_COLUMN], batch[DATA_COLUMN], strict=True):
            _write(out_dir / name, bytes(data))
        rows.append(batch.drop(columns=[DATA_COLUMN]))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({FILE_COLUMN: []})


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def shard_name(split: str, shard: int) -> str:
    return f"{split}/part-{shard:05d}.parquet"


class PackShard(schema.Step):
    """Per (split, shard) group: the shard's sequences as a Parquet file; returns it as one
    `file_result` row with its counts (the driver writes it and sums the counts)."""

    row_wise = False

    def __init__(self, plans: dict[str, SplitPlan], seq_len: int, eos_id: int):
        self.plans = plans
        self.seq_len = seq_len
        self.eos_id = eos_id

    def __call__(self, batch: pa.Table) -> pd.DataFrame:  # type: ignore[override]
        split = batch["split"][0].as_py()
        k = int(batch["shard"][0].as_py())
        plan = self.plans[split]
        order = pc.sort_indices(batch, sort_keys=[("lookahead", "ascending"), ("key", "ascending")])
        batch = batch.take(order)
        stream, lengths = stream_with_eos(batch[artifacts.TOKEN_COLUMN], self.eos_id)
        own = int(lengths[~batch["lookahead"].to_numpy(zero_copy_only=False)].sum())
        if own != plan.lengths[k]:
            raise RuntimeError(
                f"shard {split}/{k}: {own} tokens, the plan counted {plan.lengths[k]}"
            )
        first = (-plan.starts[k]) % self.seq_len
        # Sequences that start inside this shard's own tokens and end inside what it holds.
        n = 0
        if first < own:
            n = min(
                (own - first + self.seq_len - 1) // self.seq_len,
                (len(stream) - first) // self.seq_len,
            )
        seqs = stream[first : first + n * self.seq_len].reshape(n, self.seq_len)
        return file_result(
            shard_name(split, k), sequences_bytes(seqs), split=split, shard=k, sequences=n
        )


# ----------------------------------------------------------------------- reports

TEXT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("timestamp", pa.string()),
        ("text", pa.string()),
    ]
)
REPORT_COLUMNS = ["id", "source", "timestamp", "text", "key", "dropped_by", "reason", "detail"]


def text_table(frame: pd.DataFrame) -> pa.Table:
    """The text files' rows (sorted by content key), with a fixed schema."""
    frame = frame.sort_values("key", kind="stable")
    return pa.Table.from_pydict(
        {
            "id": frame["id"].tolist(),
            "source": frame["source"].tolist(),
            "timestamp": [None if pd.isna(t) else str(t) for t in frame["timestamp"]],
            "text": frame["text"].tolist(),
        },
        schema=TEXT_SCHEMA,
    )


def text_bytes(frame: pd.DataFrame) -> bytes:
    return parquet_bytes(text_table(frame), compression="zstd", row_group_size=TEXT_ROWS_PER_GROUP)


def jsonl_bytes(frame: pd.DataFrame, columns: tuple[str, ...]) -> bytes:
    frame = frame.sort_values(["source", "id"], kind="stable")
    out = io.StringIO()
    for row in frame[list(columns)].itertuples(index=False):
        out.write(json.dumps(row._asdict(), ensure_ascii=False) + "\n")
    return out.getvalue().encode("utf-8")


REJECT_FIELDS = ("id", "source", "reason", "detail")
DROPPED_FIELDS = ("id", "source", "dropped_by", "reason", "detail")


class WriteReport(schema.Step):
    """Per `file` group: that one file (rejects, dropped, test or reference text), returned
    as a `file_result` row for the driver to write.

    One task per file, so no single process but that task ever holds the file's rows.
    """

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        name = str(batch[FILE_COLUMN].iloc[0])
        return file_result(name, report_bytes(name, batch), rows=len(batch))


def report_bytes(name: str, rows: pd.DataFrame) -> bytes:
    if name == artifacts.REJECTS:
        return jsonl_bytes(rows, REJECT_FIELDS)
    if name in (artifacts.TEST_TEXT, artifacts.REFERENCE_TEXT):
        return text_bytes(rows)
    return jsonl_bytes(rows, DROPPED_FIELDS)


def write_file(name: str, rows: pd.DataFrame, out_dir: Path) -> None:
    _write(out_dir / name, report_bytes(name, rows))
