"""SFT records to split, loss-masked samples on disk, with every reject and its reason.

The library call the data stage makes for `data.format` instruction and chat
(`flywheel.sft.stage` reads the source and picks the tokenizer, then calls the parts here):
records are parsed and checked (`flywheel.sft.records`), each conversation is assigned to a
split by a salted hash of its turns, and each split is rendered (`flywheel.sft.render`)
and written::

    train/part-00000.parquet       columns id, input_ids, labels (one sample per row,
    validation/part-00000.parquet  unpadded: the training loop pads per micro-batch)
    test/part-00000.parquet
    rejects.jsonl                  one line per rejected record: id, source, reason, detail

The split is decided on the conversation, before any token exists, so a tokenizer trained
here sees the train split only (no held-out text in its merges), and a sample keeps its
split whichever tokenizer renders it. Too many rejects (`data.max_reject_share`) is a
DataError naming the commonest reason, as for raw text.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel import artifacts
from flywheel.config import DataConfig, SplitConfig
from flywheel.errors import DataError
from flywheel.sft.records import Conversation, Reject, parse_records
from flywheel.sft.render import Renderer, Sample, padding_share, render_all

LABEL_COLUMN = artifacts.LABEL_COLUMN
ID_COLUMN = "id"
PART = "part-00000.parquet"
# The micro-batch the manifest's padding share is measured at (the default train one).
PADDING_MICRO_BATCH = 8


def conversation_key(conv: Conversation) -> bytes:
    """The turns as canonical bytes: what makes two records the same sample."""
    return json.dumps([[t.role, t.content] for t in conv.turns], ensure_ascii=False).encode()


def split_of(conv: Conversation, cfg: SplitConfig) -> str:
    """validation / test / train from a salted hash of the turns: the same record lands in
    the same split on every run, and duplicates land together (no leak into held-out)."""
    digest = hashlib.sha256(cfg.salt.encode() + b"\x1f" + conversation_key(conv))
    u = int.from_bytes(digest.digest()[:8], "big") / 2**64
    if u < cfg.validation_share:
        return "validation"
    return "test" if u < cfg.validation_share + cfg.test_share else "train"


def split_conversations(
    convs: Iterable[Conversation], cfg: SplitConfig
) -> dict[str, list[Conversation]]:
    by_split: dict[str, list[Conversation]] = {s: [] for s in artifacts.SPLITS}
    for conv in convs:
        by_split[split_of(conv, cfg)].append(conv)
    return by_split


def write_samples(samples: list[Sample], dirpath: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dirpath.mkdir(parents=True, exist_ok=True)
    ids = pa.array([s.input_ids for s in samples], type=pa.list_(pa.int32()))
    labels = pa.array([s.labels for s in samples], type=pa.list_(pa.int32()))
    table = pa.table(
        {
            ID_COLUMN: pa.array([s.id for s in samples], type=pa.string()),
            artifacts.TOKEN_COLUMN: ids,
            LABEL_COLUMN: labels,
        }
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


def write_rejects(
    rejects: Iterable[Reject], out: Path, sources: Mapping[str, str] | None = None
) -> None:
    """rejects.jsonl, one line per reject; `sources` maps a record id to what to open."""
    with open(out / artifacts.REJECTS, "w") as f:
        for r in rejects:
            row = {"id": r.id, "source": (sources or {}).get(r.id, ""), "reason": r.reason}
            f.write(json.dumps(row | {"detail": r.detail}, ensure_ascii=False) + "\n")


def check_reject_share(reasons: Counter[str], records: int, cfg: DataConfig, out: Path) -> None:
    rejected = sum(reasons.values())
    if records and rejected / records > cfg.max_reject_share:
        worst, n = reasons.most_common(1)[0]
        raise DataError(
            f"{rejected:,} of {records:,} records rejected (data.max_reject_share is "
            f"{cfg.max_reject_share:g}), mostly {worst} ({n:,}); every reject with its reason: "
            f"{out / artifacts.REJECTS}"
        )


@dataclass(frozen=True)
class SftStats:
    records: int
    samples: dict[str, int]
    tokens: dict[str, int]
    response_tokens: dict[str, int]
    rejects: dict[str, int]  # reason -> count
    padding_share: float  # of the train split at PADDING_MICRO_BATCH, in file order
    longest: int = 0  # tokens in the longest sample

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_sft(
    records: int,
    by_split: Mapping[str, list[Conversation]],
    rejects: list[Reject],
    cfg: DataConfig,
    tokenizer: Any,
    out: Path,
    sources: Mapping[str, str] | None = None,
) -> SftStats:
    """Render each split's conversations and write them with every reject.

    `records`: how many were read (rejects included); `rejects` so far (read, parse).
    """
    renderer = Renderer(tokenizer, cfg.block_size, cfg.chat_template, cfg.train_on_inputs)
    rendered: dict[str, list[Sample]] = {}
    rejects = list(rejects)
    for split in artifacts.SPLITS:
        rendered[split], late = render_all(by_split.get(split, []), renderer)
        rejects += late
    out.mkdir(parents=True, exist_ok=True)
    # The rejects file first: when the share check below fails, it says what went wrong.
    write_rejects(rejects, out, sources)
    reasons = Counter(r.reason for r in rejects)
    check_reject_share(reasons, records, cfg, out)
    if not any(rendered.values()):
        raise DataError(f"no usable {cfg.format} records; rejects: {out / artifacts.REJECTS}")
    for split, part in rendered.items():
        write_samples(part, out / split)
    return SftStats(
        records=records,
        samples={k: len(v) for k, v in rendered.items()},
        tokens={k: sum(len(s.input_ids) for s in v) for k, v in rendered.items()},
        response_tokens={k: sum(s.response_tokens for s in v) for k, v in rendered.items()},
        rejects=dict(sorted(reasons.items())),
        padding_share=padding_share(
            [len(s.input_ids) for s in rendered["train"]], PADDING_MICRO_BATCH
        ),
        longest=max(len(s.input_ids) for v in rendered.values() for s in v),
    )


def prepare_sft(
    records: Iterable[Any],
    cfg: DataConfig,
    tokenizer: Any,
    out: Path,
    ids: Iterable[str] | None = None,
) -> SftStats:
    """Records (in memory) with a given tokenizer to split samples and rejects in `out`."""
    if cfg.format == "text":
        raise DataError("data.format is 'text': prepare_sft reads instruction or chat records")
    rows = list(records)
    convs, rejects = parse_records(rows, cfg.format, cfg.columns, ids)
    return write_sft(len(rows), split_conversations(convs, cfg.split), rejects, cfg, tokenizer, out)
