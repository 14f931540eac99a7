"""The data stage: source -> Ray Data blocks -> a Dataset artifact (see flywheel.artifacts).

    read > normalize > quality > exact dedup > near dedup (MinHash/LSH) > split
         > tokenizer (trained on train) > tokenize > pack > parquet shards + manifest

Per-document work runs in Ray Data `map_batches`; the keyed steps (exact dedup, LSH band
join, signature lookup) run as Ray `groupby(...).map_groups`. The driver sees metadata
(ids, reasons, digests), duplicate edges, the texts the tokenizer trainer needs (HF
tokenizers trains in one process by design), and the token ids it packs.

Determinism: sources are listed in sorted order and read with Ray's `preserve_order`;
every choice between documents (which copy to keep, the split, the reference sample,
the packing order) is made by content hash, never by arrival order. Same input + same
config -> same `content_hash` and byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel import artifacts
from flywheel.config import DataConfig, Profile
from flywheel.data import output, schema, sources, steps, tokenizer
from flywheel.data.output import DROPPED
from flywheel.data.stats import DataStats
from flywheel.errors import DataError, FlywheelError
from flywheel.runtime import ensure_ray

Progress = Callable[[str, dict], None]

# Bump when a block's logic changes what it outputs: it is part of the content hash, so
# a dataset prepared by older code is never mistaken for one prepared by this code.
PIPELINE_VERSION = 1
BLOCKS_PER_SHARD = 8192  # 8192 x 128 tokens x 4 bytes = 4 MiB before compression
UNITS_PER_BATCH = 8
META_COLUMNS = ["id", "source", "dropped_by", "reason", "detail"]


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for this stage, restored afterwards (the context is per process)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.shuffle_strategy)
    # Order preserved: `limit(max_docs)` must pick the same documents every run.
    ctx.execution_options.preserve_order = True
    # The sort-based shuffle runs as plain tasks; the default hash shuffle starts
    # aggregator actors, which costs ~3-10 s per groupby on a 2-core machine.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy = saved


def _cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ------------------------------------------------------------------------ steps


def read_documents(cfg: DataConfig, units: list[str] | None = None):
    """The source as a Ray dataset of DOC_COLUMNS rows (rejects included)."""
    import ray

    src = cfg.source
    if src.kind == "hf":
        table = sources.load_hf_table(src)
        ds = ray.data.from_arrow(table).repartition(
            max(1, min(table.num_rows // cfg.batch_size, 4 * _cpus()))
        )
        return ds.map_batches(
            sources.RecordsToDocs(src, sources.hf_source_name(src)),
            batch_format="pandas",
            batch_size=cfg.batch_size,
        )
    units = units if units is not None else sources.list_units(src)
    ds = ray.data.from_items(
        sources.unit_rows(units), override_num_blocks=max(1, min(len(units), 8 * _cpus()))
    ).map_batches(sources.ReadUnits(src), batch_format="pandas", batch_size=UNITS_PER_BATCH)
    if src.max_docs:
        ds = ds.limit(src.max_docs)
    return ds


def clean(ds, cfg: DataConfig):
    """normalize > quality > content key; every row kept, judged ones marked."""
    kw = {"batch_format": "pandas", "batch_size": cfg.batch_size}
    return (
        ds.map_batches(steps.Normalize(), **kw)
        .map_batches(steps.QualityFilter(cfg.filters), **kw)
        .map_batches(steps.ContentKey(), **kw)
    )


def exact_dedup(ds, cfg: DataConfig):
    ds = ds.map_batches(schema.keep_only, batch_format="pandas")
    if cfg.dedup.exact:
        ds = ds.groupby("bucket").map_groups(steps.ExactDedup(), batch_format="pandas")
    return ds


def _sig_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "key": batch["key"],
            "other": "",
            "minhash": batch["minhash"],
            "peer": [b""] * len(batch),
            "bucket": batch["bucket"].astype("int64"),
        }
    )


def _pairs_by(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Pair rows keyed by one end of the pair (`b` to fetch its signature, then `a`)."""
    other = "a" if column == "b" else "b"

    def rows(batch: pd.DataFrame) -> pd.DataFrame:
        keys = batch[column].astype(str)
        return pd.DataFrame(
            {
                "key": keys,
                "other": batch[other].astype(str),
                "minhash": [b""] * len(batch),
                "peer": list(batch["peer"]) if "peer" in batch else [b""] * len(batch),
                "bucket": steps._bucket(keys),
            }
        )

    rows.__name__ = f"pairs_by_{column}"
    return rows


def near_duplicate_edges(docs, cfg: DataConfig) -> pd.DataFrame:
    """Verified near-duplicate pairs (a, b, jaccard), found with LSH and Ray groupbys.

    1. one row per (document, band) -> group by band bucket -> candidate pairs;
    2. pairs keyed by b + signatures -> group -> pairs carrying b's signature;
    3. those keyed by a + signatures -> group -> Jaccard estimate, kept if >= threshold.
    Steps 2-3 are a join of pairs with signatures written as two groupbys: the
    signatures never gather in one process, and only candidate pairs move twice.
    """
    sigs = docs.map_batches(schema.keep_only, batch_format="pandas").map_batches(
        _sig_rows, batch_format="pandas"
    )
    sigs = sigs.materialize()
    pairs = (
        sigs.map_batches(
            steps.LshBands(cfg.dedup), batch_format="pandas", batch_size=cfg.batch_size
        )
        .groupby("bucket")
        .map_groups(steps.BandCandidates(), batch_format="pandas")
        .materialize()
    )
    empty = pd.DataFrame(
        {"a": pd.Series([], dtype=str), "b": pd.Series([], dtype=str), "jaccard": []}
    )
    if pairs.count() == 0:
        return empty
    with_b = (
        sigs.union(pairs.map_batches(_pairs_by("b"), batch_format="pandas"))
        .groupby("bucket")
        .map_groups(steps.AttachSignature(), batch_format="pandas")
    )
    edges = (
        sigs.union(with_b.map_batches(_pairs_by("a"), batch_format="pandas"))
        .groupby("bucket")
        .map_groups(steps.VerifyPairs(cfg.dedup.threshold), batch_format="pandas")
    )
    found = edges.to_pandas()
    return found if len(found) else empty


def _meta(ds, columns: list[str]) -> pd.DataFrame:
    frame = ds.select_columns(columns).to_pandas()
    return frame if len(frame) else pd.DataFrame({c: pd.Series([], dtype=str) for c in columns})


def _content_hash(cfg: DataConfig, digests: pd.Series) -> str:
    inputs = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    payload = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        # batch_size changes how work is cut, never the output; where the corpus lies
        # (source.path) is not content: the digests already cover every row's id, source
        # name and text, so a moved corpus keeps its hash.
        "data": cfg.model_dump(mode="json", exclude={"batch_size": True, "source": {"path"}}),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _write_rejects(
    path: Path, rejects: pd.DataFrame, columns=("id", "source", "reason", "detail")
) -> None:
    rejects = rejects.sort_values(["source", "id"], kind="stable")
    with path.open("w") as f:
        for row in rejects[list(columns)].itertuples(index=False):
            f.write(json.dumps(row._asdict(), ensure_ascii=False) + "\n")


def check_rejects(
    rejects: pd.DataFrame, rows_read: int, max_share: float, where: Path | None = None
) -> None:
    """Fail when too many rows are bad input, naming the source with the most rejects."""
    if not rows_read or len(rejects) / rows_read <= max_share:
        return
    by_source = (
        rejects.groupby("source").size().sort_index().sort_values(ascending=False, kind="stable")
    )
    worst = str(by_source.index[0])
    reasons = rejects[rejects["source"] == worst]["reason"].value_counts()
    raise DataError(
        f"{len(rejects):,} of {rows_read:,} rows rejected ({len(rejects) / rows_read:.0%} > "
        f"data.max_reject_share {max_share:.0%}); worst source: {worst} "
        f"({by_source.iloc[0]:,} rejected, mostly {reasons.index[0]})"
        + (f"; see {where}" if where else "")
    )


def _text_table(frame: pd.DataFrame) -> pa.Table:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("timestamp", pa.string()),
            ("text", pa.string()),
        ]
    )
    frame = frame.sort_values("key")
    return pa.Table.from_pydict(
        {
            "id": frame["id"].tolist(),
            "source": frame["source"].tolist(),
            "timestamp": [None if pd.isna(t) else str(t) for t in frame["timestamp"]],
            "text": frame["text"].tolist(),
        },
        schema=schema,
    )


def write_blocks(blocks: np.ndarray, split_dir: Path) -> list[str]:
    """Shards of `input_ids` (list<int32>); fixed names and row groups -> identical bytes."""
    split_dir.mkdir(parents=True, exist_ok=True)
    n, size = blocks.shape
    names = []
    for i, start in enumerate(range(0, max(n, 1), BLOCKS_PER_SHARD)):
        part = blocks[start : start + BLOCKS_PER_SHARD]
        offsets = pa.array(np.arange(0, (len(part) + 1) * size, size, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(part.reshape(-1), type=pa.int32()))
        name = f"part-{i:05d}.parquet"
        pq.write_table(
            pa.table({artifacts.TOKEN_COLUMN: column}), split_dir / name, compression="zstd"
        )
        names.append(f"{split_dir.name}/{name}")
    return names


# ------------------------------------------------------------------------ stage


def source_paths(cfg: DataConfig) -> list[Path]:
    """Local paths the stage reads (an output may not overlap them)."""
    src = cfg.source
    if src.kind == "pydocs":
        return [sources.stdlib_root()]
    if src.path and Path(src.path).exists():
        return [Path(src.path)]
    return []  # a hub dataset name: nothing local to protect


def check_output(cfg: DataConfig, out_dir: Path, store: bool = False, label: str | None = None):
    """Refuse, before any work, an output that overlaps the source or holds what this stage
    did not write (OutputDirError, exit 2). `store`: `out_dir` holds datasets by hash."""
    out_dir = Path(out_dir)
    if store:
        for source in source_paths(cfg):
            why = output.overlap(out_dir, source)
            if why:
                raise output.OutputDirError(
                    f"dataset store {out_dir} {why} (data.source.path={source})"
                )
        return
    output.check_target(out_dir, source_paths(cfg), label)


def prepare(
    profile: Profile,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    store: bool = False,
    label: str | None = None,
) -> DataStats:
    """Run the data stage; write the Dataset layout of `flywheel.artifacts` into `out_dir`.

    With `store`, `out_dir` is a dataset store and the dataset lands in
    `out_dir/<content hash[:12]>` (the same hash means the same inputs and config, so an
    earlier copy there is replaced by an identical one). `label` names `out_dir` in errors.

    Nothing outside the stage's own output is deleted or overwritten (`flywheel.data.output`):
    the dataset is built in a fresh directory beside the target and moved into place at the
    end; the target may be absent, empty, or an earlier output of this stage.

    `progress(step, info)` is called with `info["status"]` "start" and then "done" (with
    `seconds` and the step's counts) for each step: ray, read, dedup, near_dedup, split,
    tokenizer, tokenize, write.

    Raises DataError for unusable input (too many rejects, nothing left, too few tokens
    for a split); every row rejected or dropped so far is written first, with its reason,
    and the error says where.
    """
    cfg = profile.data
    out_dir = Path(out_dir)
    # A missing or empty corpus, an output that would touch the source or a stranger's
    # files, or a base tokenizer that cannot load: all fail here, before Ray starts.
    units = None if cfg.source.kind == "hf" else sources.list_units(cfg.source)
    check_output(cfg, out_dir, store, label)
    base = tokenizer.load_base(cfg.tokenizer.base) if cfg.tokenizer.base else None
    if store:
        work = output.Workspace(out_dir, "dataset", store=True)
    else:
        work = output.Workspace(out_dir.parent, out_dir.name, final=out_dir)
    run = _Run(profile, work.path, progress or (lambda step, info: None))

    def final() -> Path | None:
        if not store:
            return out_dir
        return out_dir / run.content_hash[:12] if run.content_hash else None

    try:
        stats = run(units, base)
    except BaseException as exc:
        # A block that raised inside Ray arrives as Ray's exception with ours as text.
        message = None if isinstance(exc, FlywheelError) else schema.step_failure_message(exc)
        error: BaseException = DataError(message) if message else exc
        try:
            run.write_dropped()
            kept = work.fail(final(), str(error))
        except OSError:  # a full disk, say: the original error is the one to report
            work.discard()
            kept = None
        if kept is not None and isinstance(error, DataError):
            reports = ", ".join(str(kept / r) for r in output.REPORTS if (kept / r).exists())
            error.args = (f"{error}; every rejected and dropped row, with its reason: {reports}",)
        if error is exc:
            raise
        raise error from None
    target = final()
    assert target is not None
    work.publish(target)
    stats.out_dir = str(target)
    return stats


class _Run:
    """One run of the stage in its working directory; keeps what it judged for a failure."""

    def __init__(self, profile: Profile, work: Path, report: Progress):
        self.profile = profile
        self.cfg = profile.data
        self.work = work
        self.report = report
        self.judged: list[pd.DataFrame] = []
        self.content_hash: str | None = None
        self.dropped_written = False

    def write_dropped(self) -> None:
        """dropped.jsonl from what was judged so far (a failed run keeps it too)."""
        if self.dropped_written or not self.judged:
            return
        judged_all = pd.concat(self.judged, ignore_index=True)
        columns = ("id", "source", "dropped_by", "reason", "detail")
        _write_rejects(self.work / DROPPED, judged_all, columns)
        self.dropped_written = True

    def __call__(self, units: list[str] | None, base) -> DataStats:
        """The steps, writing into the working directory (`out_dir` below)."""
        profile, cfg, out_dir, report = self.profile, self.cfg, self.work, self.report
        judged = self.judged
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        @contextlib.contextmanager
        def step(name: str) -> Iterator[dict]:
            info: dict = {}
            report(name, {"status": "start"})
            t0 = time.perf_counter()
            yield info
            timings[name] = round(time.perf_counter() - t0, 3)
            report(name, {"status": "done", "seconds": timings[name], **info})

        with step("ray"):
            ensure_ray(profile.ray)

        with _data_context():
            # -- read, normalize, quality, content key
            with step("read") as info:
                cleaned = clean(read_documents(cfg, units), cfg).materialize()
                meta = _meta(cleaned, [*META_COLUMNS, "digest"])
                rows_read = len(meta)
                rejects = meta[meta["dropped_by"] == schema.READ]
                content_hash = self.content_hash = _content_hash(cfg, meta["digest"])
                _write_rejects(out_dir / artifacts.REJECTS, rejects)
                info.update(rows=rows_read, rejected=len(rejects))
            judged.append(meta[(meta["reason"] != "") & (meta["dropped_by"] != schema.READ)])
            check_rejects(rejects, rows_read, cfg.max_reject_share)
            if not (meta["reason"] == "").any():
                raise DataError(
                    f"data.source: no document survived reading and filtering ({rows_read:,} "
                    f"rows read; {_reason_counts(meta)}); check data.filters and the source"
                )

            # -- exact + near dedup
            with step("dedup") as info:
                deduped = exact_dedup(cleaned, cfg)
                if cfg.dedup.near:
                    deduped = deduped.map_batches(
                        steps.MinHashSignature(cfg.dedup),
                        batch_format="pandas",
                        batch_size=cfg.batch_size,
                    )
                deduped = deduped.materialize()
                exact = _meta(
                    deduped.map_batches(schema.dropped_only, batch_format="pandas"), META_COLUMNS
                )
                judged.append(exact)
                info.update(exact_duplicates=len(exact))
            drops: dict[str, str] = {}
            if cfg.dedup.near:
                with step("near_dedup") as info:
                    edges = near_duplicate_edges(deduped, cfg)
                    drops = steps.duplicate_components(edges)
                    info.update(candidate_edges=len(edges), near_duplicates=len(drops))

            # -- split
            with step("split") as info:
                final = (
                    deduped.map_batches(schema.keep_only, batch_format="pandas")
                    .map_batches(
                        steps.ApplyDrops(drops), batch_format="pandas", batch_size=cfg.batch_size
                    )
                    .map_batches(
                        steps.AssignSplit(cfg.split),
                        batch_format="pandas",
                        batch_size=cfg.batch_size,
                    )
                )
                if "minhash" in deduped.columns():
                    final = final.drop_columns(["minhash"])
                final = final.materialize()
                fmeta = _meta(final, [*META_COLUMNS, "key", "split", "split_point"])
                near = fmeta[fmeta["reason"] != ""]
                kept = fmeta[fmeta["reason"] == ""]
                key_to_id = dict(zip(kept["key"], kept["id"], strict=True))
                near = near.assign(detail=near["detail"].map(lambda d: _name_kept(d, key_to_id)))
                judged.append(near)
                docs = kept["split"].value_counts().reindex(list(artifacts.SPLITS), fill_value=0)
                info.update(docs={s: int(docs[s]) for s in artifacts.SPLITS})

            # -- tokenizer
            with step("tokenizer") as info:
                tok_dir = out_dir / artifacts.TOKENIZER_DIR
                if base is not None:
                    tok = base
                else:
                    if docs["train"] == 0:
                        raise DataError(
                            "data.split: the train split is empty; nothing to train a tokenizer on"
                        )
                    train_texts = (
                        final.map_batches(_train_texts, batch_format="pandas")
                        .select_columns(["text"])
                        .iter_batches(batch_size=1024, batch_format="pandas")
                    )
                    tok = tokenizer.train_bpe(
                        (t for batch in train_texts for t in batch["text"]),
                        cfg.tokenizer,
                        length=int(docs["train"]),
                    )
                tok_info = tokenizer.save(tok, tok_dir)
                info.update(vocab_size=tok_info["vocab_size"])

            # -- tokenize + pack + write
            with step("tokenize") as info:
                tokens = (
                    final.map_batches(schema.keep_only, batch_format="pandas")
                    .select_columns(["key", "split", "text"])
                    .map_batches(
                        steps.Tokenize(tok.backend_tokenizer.to_str()),
                        batch_format="pandas",
                        batch_size=cfg.batch_size,
                    )
                    .to_pandas()
                )
                info.update(tokens=int(tokens["n_tokens"].sum()))

        with step("write") as info:
            pack = steps.Pack(cfg.block_size, tok_info["eos_token_id"])
            splits: dict[str, dict] = {}
            for split in artifacts.SPLITS:
                part = tokens[tokens["split"] == split].sort_values("key")
                blocks, tail = pack.blocks(part)
                if len(blocks) == 0 and _share(cfg, split) > 0:
                    raise DataError(
                        f"data: the {split} split has {int(part['n_tokens'].sum()):,} tokens, fewer than one "
                        f"block of data.block_size={cfg.block_size}; add documents or lower the block size"
                    )
                files = write_blocks(blocks, out_dir / split)
                splits[split] = {
                    "docs": len(part),
                    "tokens": int(blocks.size),
                    "blocks": len(blocks),
                    "tail_tokens": int(tail),
                    "files": files,
                }
            text_rows = _texts_for(final, kept, cfg.reference_sample_docs)
            (out_dir / artifacts.TEXT_DIR).mkdir(exist_ok=True)
            test_docs = text_rows[text_rows["split"] == "test"]
            ref_docs = text_rows[text_rows["ref"]]
            pq.write_table(
                _text_table(test_docs), out_dir / artifacts.TEST_TEXT, compression="zstd"
            )
            pq.write_table(
                _text_table(ref_docs), out_dir / artifacts.REFERENCE_TEXT, compression="zstd"
            )

            judged_all = pd.concat(judged, ignore_index=True)
            self.write_dropped()
            rejected = rejects["reason"].value_counts().sort_index()
            by_source = rejects["source"].value_counts().sort_index()
            dropped_by_reason = {
                f"{block}:{reason}": int(n)
                for block in schema.PIPELINE_STEPS
                for reason, n in judged_all[judged_all["dropped_by"] == block]["reason"]
                .value_counts()
                .sort_index()
                .items()
            }
            dropped = judged_all["dropped_by"].value_counts()
            stats = DataStats(
                content_hash=content_hash,
                out_dir=str(out_dir),
                docs_read=rows_read,
                docs_kept=len(kept),
                rejected={str(k): int(v) for k, v in rejected.items()},
                rejected_by_source={str(k): int(v) for k, v in by_source.items()},
                dropped={
                    b: int(dropped.get(b, 0)) for b in schema.PIPELINE_STEPS if b != schema.READ
                },
                dropped_by_reason=dropped_by_reason,
                docs={s: v["docs"] for s, v in splits.items()},
                tokens={s: v["tokens"] for s, v in splits.items()},
                blocks={s: v["blocks"] for s, v in splits.items()},
                tail_tokens={s: v["tail_tokens"] for s, v in splits.items()},
                block_size=cfg.block_size,
                vocab_size=tok_info["vocab_size"],
                tokenizer_trained=not cfg.tokenizer.base,
            )
            manifest = _manifest(cfg, stats, splits, tok_info, len(test_docs), len(ref_docs))
            # Written last: a directory with a manifest is a complete dataset.
            artifacts.DatasetManifest.model_validate(manifest).write(out_dir)
            info.update(blocks=stats.blocks)

        stats.seconds = round(time.perf_counter() - t_start, 3)
        stats.timings = timings
        return stats


def _reason_counts(meta: pd.DataFrame) -> str:
    """'quality too_short 38, read malformed_json 2': why rows went, most first."""
    judged = meta[meta["reason"] != ""]
    counts = (judged["dropped_by"] + " " + judged["reason"]).value_counts().sort_index()
    counts = counts.sort_values(ascending=False, kind="stable")
    return ", ".join(f"{what} {n:,}" for what, n in counts.items()) or "nothing judged"


def _share(cfg: DataConfig, split: str) -> float:
    return {
        "train": 1 - cfg.split.validation_share - cfg.split.test_share,
        "validation": cfg.split.validation_share,
        "test": cfg.split.test_share,
    }[split]


def _name_kept(detail: str, key_to_id: dict[str, str]) -> str:
    prefix = "near-duplicate of "
    key = detail.removeprefix(prefix)
    return prefix + key_to_id.get(key, key)


def _train_texts(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[(batch["reason"] == "") & (batch["split"] == "train")]


def _texts_for(final, kept: pd.DataFrame, reference_docs: int) -> pd.DataFrame:
    """Texts of the test split and of the drift reference sample.

    The reference is the train documents with the smallest split points: a uniform
    sample by content hash, the same on every run.
    """
    train = kept[kept["split"] == "train"].sort_values("split_point")
    ref_keys = set(train["key"].iloc[:reference_docs])
    want = ref_keys | set(kept.loc[kept["split"] == "test", "key"])

    def select(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.loc[
            batch["key"].isin(want), ["id", "source", "timestamp", "text", "key", "split"]
        ]

    frame = final.map_batches(select, batch_format="pandas").to_pandas()
    if frame.empty:
        return pd.DataFrame(columns=["id", "source", "timestamp", "text", "key", "split", "ref"])
    return frame.assign(ref=frame["key"].isin(ref_keys))


def _manifest(
    cfg: DataConfig, stats: DataStats, splits: dict, tok_info: dict, n_test: int, n_ref: int
) -> dict:
    return {
        "schema_version": artifacts.SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "content_hash": stats.content_hash,
        "config": cfg.model_dump(mode="json"),
        "block_size": cfg.block_size,
        "token_column": artifacts.TOKEN_COLUMN,
        # Flat per-split totals (the same numbers as under `splits`) for quick readers.
        "vocab_size": tok_info["vocab_size"],
        "docs": stats.docs,
        "tokens": stats.tokens,
        "blocks": stats.blocks,
        "splits": splits,
        "tokenizer": {
            "path": artifacts.TOKENIZER_DIR,
            "trained": stats.tokenizer_trained,
            "base": cfg.tokenizer.base,
            **tok_info,
        },
        "text": {
            "test": artifacts.TEST_TEXT,
            "test_docs": n_test,
            "reference": artifacts.REFERENCE_TEXT,
            "reference_docs": n_ref,
        },
        "counts": {
            "read": stats.docs_read,
            "rejected": stats.rejected_total,
            "kept": stats.docs_kept,
            "blocks": _block_counts(stats),
        },
        "rejects": {
            "file": artifacts.REJECTS,
            "by_reason": stats.rejected,
            "by_source": stats.rejected_by_source,
        },
        "dropped": {
            "file": DROPPED,
            "by_block": stats.dropped,
            "by_reason": stats.dropped_by_reason,
        },
    }


def _block_counts(stats: DataStats) -> list[dict]:
    """read / kept / dropped-by-reason per block, in pipeline order."""
    out = []
    n = stats.docs_read
    for block in schema.PIPELINE_STEPS:
        if block == schema.READ:
            dropped = dict(stats.rejected)
        else:
            prefix = f"{block}:"
            dropped = {
                k.removeprefix(prefix): v
                for k, v in stats.dropped_by_reason.items()
                if k.startswith(prefix)
            }
        kept = n - sum(dropped.values())
        out.append({"name": block, "read": n, "kept": kept, "dropped": dropped})
        n = kept
    return out
