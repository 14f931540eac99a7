"""Dedup against what the champion already saw (`data.dedup.against_champion`, `data.dedup.index`).

Every prepare writes a dedup index with its dataset, `dedup_index/`: the kept documents'
content keys, ids and MinHash signatures, one Parquet file per key bucket (written by Ray
tasks, rows sorted by key, so the files are byte-identical run to run), and `index.json`
with the MinHash settings they were computed with. A later prepare reads the index of the
champion's dataset (found through the champion's data-hash lineage tag in the dataset
store, or named by `data.dedup.index`) and drops the documents that are exact copies
(`exact_dedup`, `champion_copy`) or near-duplicates (`near_dedup`, `champion_near_duplicate`)
of it, counted in the manifest like every other drop.

Inside the stage the index rows never pass through the driver: exact copies are a join of
keys by bucket (one Ray groupby), near-duplicates join the LSH graph as extra nodes whose
keys start with MARK, which sorts before every hex key, so a component that holds a
champion document keeps it and drops every new document in it. Replayed champion
documents (`flywheel.forgetting`, added on purpose) are never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.config import DedupConfig, Profile
from flywheel.data import schema
from flywheel.errors import DataError

INDEX_DIR = "dedup_index"
META = "index.json"
MARK = "!"  # prefix of the champion's keys in the near-duplicate graph (sorts before 0-9a-f)
COPY = "champion_copy"
NEAR = "champion_near_duplicate"
REPLAY_SOURCE = "replay-champion.jsonl"  # flywheel.forgetting.REPLAY_FILE (test holds them equal)
SEED = 1  # MinHashSignature's default seed: signatures are comparable only with the same one
_SCHEMA = pa.schema([("key", pa.string()), ("id", pa.string()), ("minhash", pa.binary())])


def meta(cfg: DedupConfig) -> dict:
    """What makes two signatures comparable (a mismatch is refused, not silently ignored)."""
    return {
        "near": cfg.near,
        "num_perm": cfg.num_perm,
        "bands": cfg.bands,
        "shingle_size": cfg.shingle_size,
        "seed": SEED,
    }


def index_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """Kept documents as index rows (`key`, `id`, `minhash`, `bucket`)."""
    kept = batch[batch["reason"] == ""]
    minhash = kept["minhash"] if "minhash" in kept else pd.Series(b"", index=kept.index)
    return pd.DataFrame(
        {
            "key": kept["key"],
            "id": kept["id"].astype(str),
            "minhash": minhash,
            "bucket": kept["bucket"],
        }
    )


class WriteIndex(schema.Step):
    """Per key bucket: one Parquet file of index rows sorted by key. Returns (file, rows)."""

    row_wise = False

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.sort_values("key", kind="stable").drop_duplicates("key")
        bucket = int(batch["bucket"].iloc[0])
        name = f"{INDEX_DIR}/part-{bucket:03d}.parquet"
        table = pa.Table.from_pandas(
            rows[["key", "id", "minhash"]], schema=_SCHEMA, preserve_index=False
        )
        path = Path(self.out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return pd.DataFrame({"file": [name], "rows": [len(rows)]})


def write(final, cfg: DedupConfig, out_dir: Path, content_hash: str) -> int:
    """The index of `final`'s kept documents under out_dir/dedup_index; returns its rows.
    `content_hash`: the dataset's, so a prepare deduplicated against it names it."""
    columns = [c for c in ("key", "id", "minhash", "bucket", "reason") if c in final.columns()]
    written = (
        final.select_columns(columns)  # not the texts: converting them was most of the pass
        .map_batches(index_rows, batch_format="pandas")
        .groupby("bucket")
        .map_groups(WriteIndex(str(out_dir)), batch_format="pandas")
        .to_pandas()
    )
    (out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    info = {**meta(cfg), "content_hash": content_hash}
    (out_dir / INDEX_DIR / META).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n")
    return int(written["rows"].sum()) if len(written) else 0


# ------------------------------------------------------------------------ finding it


def resolve(profile: Profile) -> Path | None:
    """The index directory to dedup against: `data.dedup.index` (a dataset directory or its
    dedup_index/), else the champion's with `data.dedup.against_champion`, else None.
    Checked before Ray starts; a missing or incompatible index is a DataError."""
    cfg = profile.data.dedup
    if cfg.index:
        where, field = Path(cfg.index).expanduser(), "data.dedup.index"
    elif cfg.against_champion:
        found = champion_dataset(profile)
        if found is None:
            return None  # no champion yet: nothing was seen
        where, field = found, "data.dedup.against_champion"
    else:
        return None
    index = where / INDEX_DIR if (where / INDEX_DIR).is_dir() else where
    if not (index / META).is_file():
        raise DataError(f"{field}: {where} holds no dedup index ({INDEX_DIR}/{META})")
    have = json.loads((index / META).read_text())
    have.pop("content_hash", None)
    want = meta(cfg)
    if cfg.near and have != want:
        diff = ", ".join(f"{k} {have.get(k)} vs {v}" for k, v in want.items() if have.get(k) != v)
        raise DataError(
            f"{field}: the index at {index} was built with other MinHash settings ({diff}); "
            "prepare with the same data.dedup settings or set data.dedup.near=false"
        )
    return index


def champion_dataset(profile: Profile) -> Path | None:
    """The champion's dataset directory in the dataset store, through its data-hash lineage
    tag; None without a champion."""
    from flywheel import contracts
    from flywheel.defaults import DATASETS
    from flywheel.registry import TAG_DATA_HASH, Registry

    champ = Registry(profile).champion()
    if champ is None:
        return None
    data_hash = champ.tags.get(contracts.TAG_DATA_HASH) or champ.tags.get(TAG_DATA_HASH)
    if not data_hash:
        raise DataError(
            f"data.dedup.against_champion: the champion (version {champ.version}) carries no "
            f"data-hash lineage tag ({contracts.TAG_DATA_HASH}); set data.dedup.index instead"
        )
    store = profile.state_root() / DATASETS  # where `flywheel data prepare` stores by hash
    where = store / data_hash[:12]
    if not where.is_dir():
        raise DataError(
            f"data.dedup.against_champion: the champion's dataset {data_hash[:12]} is not in "
            f"the dataset store {store}; set data.dedup.index to its directory"
        )
    return where


def seen_hash(index: Path | None) -> str:
    """The content hash of the dataset an index was written with ("" for none)."""
    if index is None:
        return ""
    return str(json.loads((index / META).read_text()).get("content_hash", ""))


# ------------------------------------------------------------------- using it in Ray


def read(index: Path):
    """The index as a Ray dataset (`key`, `id`, `minhash`), files in name order."""
    import ray

    files = sorted(str(f) for f in index.glob("part-*.parquet"))
    if not files:
        return None
    return ray.data.read_parquet(files)


def sig_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """Index rows as signature rows of the near-duplicate graph (keys marked)."""
    return pd.DataFrame(
        {
            "key": MARK + batch["key"].astype(str),
            "other": "",
            "minhash": batch["minhash"],
            "peer": [b""] * len(batch),
            "bucket": schema.bucket(batch["key"].astype(str)),
        }
    )


def id_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """Index rows as (`kept`, `kept_id`) for marked keys."""
    return pd.DataFrame({"kept": MARK + batch["key"].astype(str), "kept_id": batch["id"]})


def not_both_champion(batch: pd.DataFrame) -> pd.DataFrame:
    """Candidate pairs between two champion documents were judged by the champion's own
    prepare: not verified again."""
    return batch[~(batch["a"].str.startswith(MARK) & batch["b"].str.startswith(MARK))]


def copy_key_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """Kept documents' keys (`id` empty), to join with index keys; replays left out."""
    mine = batch[(batch["reason"] == "") & (batch["source"] != REPLAY_SOURCE)]
    return pd.DataFrame({"key": mine["key"], "id": "", "indexed": False, "bucket": mine["bucket"]})


def index_key_rows(batch: pd.DataFrame) -> pd.DataFrame:
    keys = batch["key"].astype(str)
    return pd.DataFrame(
        {"key": keys, "id": batch["id"].astype(str), "indexed": True, "bucket": schema.bucket(keys)}
    )


def copies(batch: pd.DataFrame) -> pd.DataFrame:
    """Per key bucket: documents whose key the index holds, as (`key`, `kept_id`)."""
    is_index = batch["indexed"].astype(bool)
    seen = batch[is_index].drop_duplicates("key").set_index("key")["id"]
    mine = batch.loc[~is_index, "key"].drop_duplicates()
    mine = mine[mine.isin(seen.index)]
    return pd.DataFrame({"key": mine.to_numpy(), "kept_id": seen.reindex(mine).to_numpy()})
