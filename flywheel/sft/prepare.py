"""SFT records to split, loss-masked samples on disk, with every reject and its reason.

The library call the data stage makes for `data.format` instruction and chat:
`prepare_sft(records, cfg, tokenizer, out)` parses, checks and renders the records
(`flywheel.sft.records`, `flywheel.sft.render`), assigns each sample to a split by a
salted hash of its content, and writes::

    train/part-00000.parquet       columns id, input_ids, labels (one sample per row,
    validation/part-00000.parquet  unpadded: the training loop pads per micro-batch)
    test/part-00000.parquet
    rejects.jsonl                  one line per rejected record: id, reason, detail

Too many rejects (`data.max_reject_share`) is a DataError naming the commonest reason,
as for raw text.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel import artifacts
from flywheel.config import DataConfig, SplitConfig
from flywheel.errors import DataError
from flywheel.sft.render import Sample, padding_share, records_to_samples

LABEL_COLUMN = "labels"
ID_COLUMN = "id"
PART = "part-00000.parquet"


def split_of(sample: Sample, cfg: SplitConfig) -> str:
    """validation / test / train from a salted hash of the token ids: the same sample lands
    in the same split on every run, and duplicates land together (no leak into held-out)."""
    digest = hashlib.sha256(cfg.salt.encode() + b"\x1f" + bytes(str(sample.input_ids), "ascii"))
    u = int.from_bytes(digest.digest()[:8], "big") / 2**64
    if u < cfg.validation_share:
        return "validation"
    return "test" if u < cfg.validation_share + cfg.test_share else "train"


def write_samples(samples: list[Sample], dirpath: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dirpath.mkdir(parents=True, exist_ok=True)
    ids = pa.array([s.input_ids for s in samples], type=pa.list_(pa.int32()))
    labels = pa.array([s.labels for s in samples], type=pa.list_(pa.int32()))
    table = pa.table(
        {ID_COLUMN: [s.id for s in samples], artifacts.TOKEN_COLUMN: ids, LABEL_COLUMN: labels}
    )
    pq.write_table(table, dirpath / PART)
    return dirpath / PART


def read_samples(dirpath: Path) -> list[Sample]:
    import pyarrow.parquet as pq

    table = pq.read_table(dirpath).to_pydict()
    return [
        Sample(i, list(ids), list(labels))
        for i, ids, labels in zip(
            table[ID_COLUMN], table[artifacts.TOKEN_COLUMN], table[LABEL_COLUMN], strict=True
        )
    ]


@dataclass(frozen=True)
class SftStats:
    records: int
    samples: dict[str, int]
    tokens: dict[str, int]
    response_tokens: dict[str, int]
    rejects: dict[str, int]  # reason -> count
    padding_share: float  # of the train split at micro-batch 8, in file order

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prepare_sft(
    records: Iterable[Any],
    cfg: DataConfig,
    tokenizer: Any,
    out: Path,
    ids: Iterable[str] | None = None,
) -> SftStats:
    rows = list(records)
    samples, rejects = records_to_samples(rows, cfg, tokenizer, ids)
    out.mkdir(parents=True, exist_ok=True)
    # The rejects file first: when the share check below fails, it says what went wrong.
    with open(out / artifacts.REJECTS, "w") as f:
        for r in rejects:
            f.write(json.dumps({"id": r.id, "reason": r.reason, "detail": r.detail}) + "\n")
    reasons = Counter(r.reason for r in rejects)
    if rows and len(rejects) / len(rows) > cfg.max_reject_share:
        worst, n = reasons.most_common(1)[0]
        raise DataError(
            f"{len(rejects):,} of {len(rows):,} records rejected (data.max_reject_share is "
            f"{cfg.max_reject_share:g}), mostly {worst} ({n:,}); every reject with its reason: "
            f"{out / artifacts.REJECTS}"
        )
    if not samples:
        raise DataError(f"no usable {cfg.format} records; rejects: {out / artifacts.REJECTS}")
    by_split: dict[str, list[Sample]] = {s: [] for s in artifacts.SPLITS}
    for sample in samples:
        by_split[split_of(sample, cfg.split)].append(sample)
    for split, part in by_split.items():
        write_samples(part, out / split)
    return SftStats(
        records=len(rows),
        samples={k: len(v) for k, v in by_split.items()},
        tokens={k: sum(len(s.input_ids) for s in v) for k, v in by_split.items()},
        response_tokens={k: sum(s.response_tokens for s in v) for k, v in by_split.items()},
        rejects=dict(reasons),
        padding_share=padding_share([len(s.input_ids) for s in by_split["train"]], 8),
    )
