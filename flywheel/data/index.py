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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from flywheel import storage
from flywheel.config import DedupConfig, Profile
from flywheel.data import schema, shards
from flywheel.errors import DataError, StorageError

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
    """Per key bucket: one Parquet file of index rows sorted by key, returned as a
    `shards.file_result` row (file, bytes, rows) for the driver to write."""

    row_wise = False

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.sort_values("key", kind="stable").drop_duplicates("key")
        bucket = int(batch["bucket"].iloc[0])
        name = f"{INDEX_DIR}/part-{bucket:03d}.parquet"
        table = pa.Table.from_pandas(
            rows[["key", "id", "minhash"]], schema=_SCHEMA, preserve_index=False
        )
        return shards.file_result(name, shards.parquet_bytes(table), rows=len(rows))


def write(final, cfg: DedupConfig, out_dir: Path, content_hash: str) -> int:
    """The index of `final`'s kept documents under out_dir/dedup_index; returns its rows.
    `content_hash`: the dataset's, so a prepare deduplicated against it names it."""
    columns = [c for c in ("key", "id", "minhash", "bucket", "reason") if c in final.columns()]
    written = shards.gather_files(
        final.select_columns(columns)  # not the texts: converting them was most of the pass
        .map_batches(index_rows, batch_format="pandas")
        .groupby("bucket")
        .map_groups(WriteIndex(), batch_format="pandas"),
        out_dir,
    )
    (out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    info = {**meta(cfg), "content_hash": content_hash}
    (out_dir / INDEX_DIR / META).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n")
    return int(written["rows"].sum()) if len(written) else 0


# ------------------------------------------------------------------------ finding it


@dataclass(frozen=True)
class Seen:
    """A dedup index to drop duplicates of: where it is (a directory or a storage URI, as
    given), its `index.json`, and its Parquet parts, named on `filesystem` (None: local).
    A URI is read where it lies: Ray's tasks open the parts themselves, so on a cluster no
    node needs a copy on its own disk."""

    where: str
    info: dict
    files: tuple[str, ...]
    filesystem: object | None = None

    @property
    def content_hash(self) -> str:
        """The content hash of the dataset the index was written with ("" if unknown)."""
        return str(self.info.get("content_hash", ""))


def resolve(profile: Profile) -> Seen | None:
    """The index to dedup against: `data.dedup.index` (a dataset directory or its
    dedup_index/, a path or a storage URI), else the champion's with
    `data.dedup.against_champion`, else None. Checked before Ray starts; a missing or
    incompatible index is a DataError."""
    cfg = profile.data.dedup
    if cfg.index:
        where, field = cfg.index, "data.dedup.index"
    elif cfg.against_champion:
        found = champion_dataset(profile)
        if found is None:
            return None  # no champion yet: nothing was seen
        where, field = str(found), "data.dedup.against_champion"
    else:
        return None
    seen = _locate(where, field, profile.storage.endpoint_url)
    have = dict(seen.info)
    have.pop("content_hash", None)
    want = meta(cfg)
    if cfg.near and have != want:
        diff = ", ".join(f"{k} {have.get(k)} vs {v}" for k, v in want.items() if have.get(k) != v)
        raise DataError(
            f"{field}: the index at {seen.where} was built with other MinHash settings ({diff}); "
            "prepare with the same data.dedup settings or set data.dedup.near=false"
        )
    return seen


def _locate(where: str, field: str, endpoint_url: str | None) -> Seen:
    """The index at `where` (the directory itself or the dataset holding it)."""
    import pyarrow.fs as pafs

    if not storage.is_remote(where):
        local = Path(storage.parse(where, field).path).expanduser()
        index = local / INDEX_DIR if (local / INDEX_DIR).is_dir() else local
        if not (index / META).is_file():
            raise DataError(f"{field}: {where} holds no dedup index ({INDEX_DIR}/{META})")
        files = tuple(sorted(str(f) for f in index.glob("part-*.parquet")))
        return Seen(str(index), json.loads((index / META).read_text()), files)
    loc = storage.parse(where, field)
    fs = storage.filesystem(loc, endpoint_url)
    try:
        root = loc.path.rstrip("/")
        if fs.get_file_info(f"{root}/{INDEX_DIR}/{META}").type == pafs.FileType.File:
            root = f"{root}/{INDEX_DIR}"
        if fs.get_file_info(f"{root}/{META}").type != pafs.FileType.File:
            raise DataError(f"{field}: {where} holds no dedup index ({INDEX_DIR}/{META})")
        with fs.open_input_stream(f"{root}/{META}") as f:
            info = json.loads(f.read())
        listed = fs.get_file_info(pafs.FileSelector(root))
    except DataError:
        raise
    except Exception as exc:
        raise StorageError(storage.explain(exc, loc, field, endpoint_url)) from None
    names = sorted(i.path for i in listed if Path(i.path).name.startswith("part-"))
    return Seen(where, info, tuple(n for n in names if n.endswith(".parquet")), fs)


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


def seen_hash(seen: Seen | None) -> str:
    """The content hash of the dataset an index was written with ("" for none)."""
    return seen.content_hash if seen is not None else ""


# ------------------------------------------------------------------- using it in Ray


def read(seen: Seen):
    """The index as a Ray dataset (`key`, `id`, `minhash`), files in name order."""
    import ray

    if not seen.files:
        return None
    return ray.data.read_parquet(list(seen.files), filesystem=seen.filesystem)


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
