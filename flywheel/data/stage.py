"""The data stage: source -> Ray Data steps -> a Dataset artifact (see flywheel.artifacts).

    read > normalize > quality > exact dedup > near dedup (MinHash/LSH) > split
         > tokenizer (trained on train) > tokenize > pack + write shards > reports + manifest

Everything proportional to the corpus runs in Ray: per-document steps in `map_batches`,
keyed ones (exact dedup's keys and ids, the LSH band join, near-duplicate components,
packing by shard, one task per report file, the dedup index by key bucket) as
`groupby(...).map_groups`; shards, reports and the index are written by those tasks
(`flywheel.data.shards`, `flywheel.data.index`). The drops reach the documents as Ray
object refs (a broadcast join sized by the duplicates, never by the corpus). The driver
holds counts (added up from per-batch counts), small samples (the reference sample's
keys), object refs, and streams the sorted row digests into the content hash without
keeping them; the tokenizer trains inside a Ray task.

Determinism: sources are listed in sorted order and read with Ray's `preserve_order`;
every choice between documents (which copy to keep, the split, the reference sample,
the packing order, the shard cuts) is made by content hash, never by arrival order. Same
input + same config -> same `content_hash` and byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from flywheel import artifacts
from flywheel import progress as progress_events
from flywheel.config import DataConfig, Profile
from flywheel.data import index, output, schema, shards, sources, steps, tokenizer
from flywheel.data.output import DROPPED
from flywheel.data.stats import DataStats
from flywheel.errors import DataError, FlywheelError
from flywheel.progress import DataStepDone, DataStepStarted, Progress
from flywheel.runtime import ensure_ray

# Bump when a step's logic changes what it outputs: it is part of the content hash, so
# a dataset prepared by older code is never mistaken for one prepared by this code.
# 2: MinHash over 64-bit shingle hashes (rensa); shards cut by key range (flywheel.data.shards).
# 3: a dedup index (flywheel.data.index) written with every dataset.
PIPELINE_VERSION = 3
UNITS_PER_BATCH = 8


@contextlib.contextmanager
def data_context() -> Iterator[None]:
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


def read_documents(
    cfg: DataConfig,
    units: list[str] | None = None,
    then: Sequence = (),
    endpoint_url: str | None = None,
):
    """The source as a Ray dataset of DOC_COLUMNS rows (rejects included), each batch of
    `cfg.batch_size` rows then passed through the steps `then` in the same task. A source
    URI is read in place by the tasks (`endpoint_url`: its S3 endpoint)."""
    import ray

    kw: dict[str, Any] = {"batch_format": "pandas", "batch_size": cfg.batch_size}
    src = cfg.source
    if src.kind == "hf":
        table = sources.load_hf_table(src)
        ds = ray.data.from_arrow(table).repartition(
            max(1, min(table.num_rows // cfg.batch_size, 4 * _cpus()))
        )
        ds = ds.map_batches(sources.RecordsToDocs(src, sources.hf_source_name(src)), **kw)
        for step in then:
            ds = ds.map_batches(step, **kw)
        return ds
    units = units if units is not None else sources.list_units(src, endpoint_url)
    cpus = _cpus()
    # Units per read task: up to UNITS_PER_BATCH, and at least 4 tasks per CPU where there
    # are units for them (8 large files were once one task on one core).
    per_task = max(1, min(UNITS_PER_BATCH, len(units) // (4 * cpus)))
    items = ray.data.from_items(
        sources.unit_rows(units), override_num_blocks=max(1, min(len(units), 8 * cpus))
    )
    reader = sources.ReadUnits(src, endpoint_url)
    if not src.max_docs:
        # One map: see schema.Chain for why the steps are not maps of their own here.
        chain = schema.Chain(reader, *then, batch_size=cfg.batch_size)
        return items.map_batches(chain, batch_format="pandas", batch_size=per_task)
    # `limit` before the steps: the first max_docs documents read, and no work on the rest.
    ds = items.map_batches(reader, batch_format="pandas", batch_size=per_task).limit(src.max_docs)
    for step in then:
        ds = ds.map_batches(step, **kw)
    return ds


def clean_steps(cfg: DataConfig) -> list[schema.Step]:
    """normalize > quality > content key > MinHash signature (with near dedup on): every
    row kept, judged ones marked. The signature is made here, in the read task, rather
    than after exact dedup: one pass over the texts fewer, at the cost of hashing the
    exact copies too."""
    out = [steps.Normalize(), steps.QualityFilter(cfg.filters), steps.ContentKey()]
    if cfg.dedup.near:
        out.append(steps.MinHashSignature(cfg.dedup))
    return out


def exact_firsts(docs, cfg: DataConfig) -> list:
    """Object refs of Arrow tables of (`key`, `first`): each key held by more than one kept
    document, with its smallest id (steps.ExactFirst). Only keys and ids are grouped in
    Ray (the texts do not move); the tables are broadcast to steps.MarkCopies. [] with
    exact dedup off."""
    if not cfg.dedup.exact:
        return []
    return (
        docs.select_columns(["key", "id", "bucket", "reason"])
        .map_batches(schema.keep_only, batch_format="pandas")
        .groupby("bucket")
        .map_groups(steps.ExactFirst(), batch_format="pandas")
        .materialize()
        .to_arrow_refs()
    )


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


def near_duplicate_edges(docs, cfg: DataConfig, seen: index.Seen | None = None):
    """Verified near-duplicate pairs (a, b, jaccard) as a materialized Ray dataset, found
    with LSH and Ray groupbys; None when no two documents share a band.

    1. one row per (document, band) -> group by band bucket -> candidate pairs;
    2. pairs keyed by b + signatures -> group -> pairs carrying b's signature;
    3. those keyed by a + signatures -> group -> Jaccard estimate, kept if >= threshold.
    Steps 2-3 are a join of pairs with signatures written as two groupbys: the
    signatures never gather in one process, and only candidate pairs move twice.
    `seen`: a dedup index whose documents join the graph as nodes keyed `index.MARK + key`.
    """
    # Columns first: a map over whole rows would turn every text into a Python string.
    sigs = (
        docs.select_columns(["key", "minhash", "bucket", "reason"])
        .map_batches(schema.keep_only, batch_format="pandas")
        .map_batches(_sig_rows, batch_format="pandas")
    )
    champion = index.read(seen) if seen is not None else None
    if champion is not None:
        sigs = sigs.union(champion.map_batches(index.sig_rows, batch_format="pandas"))
    sigs = sigs.materialize()
    pairs = (
        sigs.map_batches(
            steps.LshBands(cfg.dedup), batch_format="pandas", batch_size=cfg.batch_size
        )
        .groupby("bucket")
        .map_groups(steps.BandCandidates(), batch_format="pandas")
        .map_batches(index.not_both_champion, batch_format="pandas")
        .materialize()
    )
    if pairs.count() == 0:
        return None
    with_b = (
        sigs.union(pairs.map_batches(_pairs_by("b"), batch_format="pandas"))
        .groupby("bucket")
        .map_groups(steps.AttachSignature(), batch_format="pandas")
    )
    return (
        sigs.union(with_b.map_batches(_pairs_by("a"), batch_format="pandas"))
        .groupby("bucket")
        .map_groups(steps.VerifyPairs(cfg.dedup.threshold), batch_format="pandas")
        .materialize()
    )


# Up to this many verified edges, one Ray task clusters them with the union-find
# (~150 MB of keys); above it, min-label propagation over Ray groupbys
# (`steps.SendLabels`/`steps.MinLabel`), whose tasks hold one bucket each.
ONE_TASK_EDGES = 1_000_000


def near_duplicate_components(edges, one_task_edges: int = ONE_TASK_EDGES):
    """{dropped key -> kept key} as a materialized Ray dataset (`key`, `kept`): each
    connected component of `edges` keeps its smallest key. Never on the driver."""
    kw = {"batch_format": "pandas"}
    if edges.count() <= one_task_edges:
        return (
            edges.repartition(1).map_batches(steps.components_frame, batch_size=None, **kw)
        ).materialize()
    both = edges.map_batches(steps.edge_rows, **kw).materialize()
    labels = (
        both.map_batches(steps.initial_rows, **kw)
        .groupby("bucket")
        .map_groups(steps.MinLabel(), **kw)
        .materialize()
    )
    while True:  # rounds: the longest shortest path in a component, plus one
        labels = (
            labels.drop_columns(["changed"])
            .union(both)
            .groupby("bucket")
            .map_groups(steps.SendLabels(), **kw)
            .groupby("bucket")
            .map_groups(steps.MinLabel(), **kw)
            .materialize()
        )
        if not labels.sum("changed"):
            break
    return labels.map_batches(_moved, **kw).materialize()


def _moved(batch: pd.DataFrame) -> pd.DataFrame:
    moved = batch[batch["key"] != batch["label"]]
    return pd.DataFrame({"key": moved["key"], "kept": moved["label"]})


class _KeptIds(schema.Step):
    """Rows (`kept`, `kept_id`): the id of each kept document named in `tables` (object
    refs of the components), read from the documents still kept."""

    def __init__(self, tables: list):
        self.tables = tables
        self.kept: set | None = None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.kept is None:
            self.kept = set(steps.frame_of_refs(self.tables)["kept"])
        mine = batch[(batch["reason"] == "") & batch["key"].isin(self.kept)]
        return pd.DataFrame({"kept": mine["key"], "kept_id": mine["id"]})


def _counts(ds, by: list[str], where: Callable[[pd.DataFrame], pd.Series] | None = None):
    """Rows per value of `by` (column "n"): counted per batch in Ray, added up here. The
    driver sees one small frame per batch, never the rows."""

    def count(batch: pd.DataFrame) -> pd.DataFrame:
        if where is not None:
            batch = batch[where(batch)]
        return batch.groupby(by, sort=True).size().reset_index(name="n")

    using = [c for c in ds.columns() if c in {*by, "dropped_by", "reason", "split"}]
    parts = ds.select_columns(using).map_batches(count, batch_format="pandas").to_pandas()
    if parts.empty:
        return pd.DataFrame({**{c: pd.Series([], dtype=str) for c in by}, "n": []})
    return parts.groupby(by, sort=True)["n"].sum().reset_index()


def _judged(batch: pd.DataFrame) -> pd.Series:
    return batch["reason"] != ""


def _digests_hash(ds) -> str:
    """sha256 of the sorted row digests, sorted by Ray and streamed through here."""
    h = hashlib.sha256()
    first = True
    for batch in ds.select_columns(["digest"]).sort("digest").iter_batches(batch_format="pyarrow"):
        chunk = "\n".join(batch.column(0).to_pylist())
        if chunk or batch.num_rows:
            h.update((("" if first else "\n") + chunk).encode())
            first = False
    return h.hexdigest()


def _content_hash(
    cfg: DataConfig, digests: pd.Series | None = None, inputs: str = "", seen: str = ""
) -> str:
    if digests is not None:
        inputs = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    payload = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        # batch_size changes how work is cut, never the output; where the corpus lies
        # (source.path) is not content: the digests already cover every row's id, source
        # name and text, so a moved corpus keeps its hash.
        "data": cfg.model_dump(
            mode="json", exclude={"batch_size": True, "source": {"path"}, "dedup": {"index"}}
        ),
        "inputs": inputs,
    }
    if seen:  # the dataset deduplicated against (where its index lies is not content)
        payload["dedup_against"] = seen
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_rejects(
    rejects: pd.DataFrame, rows_read: int, max_share: float, where: Path | None = None
) -> None:
    """Fail when too many rows are bad input, naming the source with the most rejects.

    `rejects`: one row per reject, or counts (`source`, `reason`, `n`)."""
    n = rejects["n"] if "n" in rejects else pd.Series(1, index=rejects.index)
    total = int(n.sum())
    if not rows_read or total / rows_read <= max_share:
        return
    by_source = (
        n.groupby(rejects["source"]).sum().sort_index().sort_values(ascending=False, kind="stable")
    )
    worst = str(by_source.index[0])
    mine = rejects["source"] == worst
    reasons = n[mine].groupby(rejects.loc[mine, "reason"]).sum().sort_index()
    reasons = reasons.sort_values(ascending=False, kind="stable")
    raise DataError(
        f"{total:,} of {rows_read:,} rows rejected ({total / rows_read:.0%} > "
        f"data.max_reject_share {max_share:.0%}); worst source: {worst} "
        f"({by_source.iloc[0]:,} rejected, mostly {reasons.index[0]})"
        + (f"; see {where}" if where else "")
    )


def _report_rows(file: str, text: bool = False) -> Callable[[pd.DataFrame], pa.Table]:
    """Rows of one report file in the common report columns (texts only for text files),
    all strings: every part of the union has the same schema, whatever its batch held."""

    def rows(batch: pd.DataFrame) -> pa.Table:
        out = pd.DataFrame({c: batch.get(c, "") for c in shards.REPORT_COLUMNS}, index=batch.index)
        stamp = batch["timestamp"] if "timestamp" in batch else pd.Series(None, index=batch.index)
        out["timestamp"] = [None if pd.isna(t) else str(t) for t in stamp]
        if not text:
            out["text"] = ""  # a report line never carries the text: do not move it
        out["file"] = file
        return pa.Table.from_pandas(out, schema=_REPORT_SCHEMA, preserve_index=False)

    rows.__name__ = f"rows_of_{Path(file).name}"
    return rows


_REPORT_SCHEMA = pa.schema([(c, pa.string()) for c in [*shards.REPORT_COLUMNS, "file"]])


def write_reports(parts: list, out_dir: Path) -> dict[str, int]:
    """Write report files from `(file name, dataset)` pairs, one Ray task per file; a file
    with no rows is written empty. Returns rows per file."""
    from flywheel.data.shards import WriteReport

    names = [name for name, _ in parts]
    datasets = [
        ds.map_batches(
            _report_rows(name, name.startswith(artifacts.TEXT_DIR)), batch_format="pandas"
        )
        for name, ds in parts
    ]
    union = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    done = shards.gather_files(
        union.groupby("file").map_groups(WriteReport(), batch_format="pandas"), out_dir
    )
    rows = dict(zip(done["file"], done["rows"].astype(int), strict=True)) if len(done) else {}
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in shards.REPORT_COLUMNS})
    for name in names:
        if name not in rows:
            shards.write_file(name, empty, out_dir)
            rows[name] = 0
    return rows


def _key_part_tokens(tokens, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Stream tokens (EOS included) per key range and split: summed per batch in Ray (one
    row per range present), added into fixed-size arrays here, batch by batch."""

    def count(batch: pa.Table) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "split": batch["split"].to_numpy(zero_copy_only=False),
                "part": shards.key_part(batch["key"].to_pylist()),
                "tokens": batch["n_tokens"].to_numpy() + 1,
            }
        )
        return frame.groupby(["split", "part"], sort=True)["tokens"].sum().reset_index()

    totals = {s: np.zeros(shards.KEY_PARTS, dtype=np.int64) for s in splits}
    for frame in (
        tokens.select_columns(["key", "split", "n_tokens"])
        .map_batches(count, batch_format="pyarrow")
        .iter_batches(batch_format="pandas")
    ):
        for split, rows in frame.groupby("split"):
            np.add.at(totals[str(split)], rows["part"].to_numpy(), rows["tokens"].to_numpy())
    return totals


def _reference_keys(final, k: int) -> list[str]:
    """Keys of the k train documents with the smallest split points, kept streaming."""
    if k <= 0:
        return []

    def smallest(batch: pd.DataFrame) -> pd.DataFrame:
        train = batch[(batch["reason"] == "") & (batch["split"] == "train")]
        return _first(train, k)[["key", "split_point"]]

    best = pd.DataFrame(
        {"key": pd.Series([], dtype=str), "split_point": pd.Series([], dtype=float)}
    )
    for batch in (
        final.select_columns(["key", "split", "reason", "split_point"])
        .map_batches(smallest, batch_format="pandas")
        .iter_batches(batch_format="pandas")
    ):
        best = _first(pd.concat([best, batch], ignore_index=True), k)
    return best["key"].tolist()


def _first(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    return frame.sort_values(["split_point", "key"], kind="stable").head(k)


# ------------------------------------------------------------------------ stage


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

    `progress` gets `DataStepStarted` and then `DataStepDone` (with seconds and the step's
    counts) for each step: ray, read, dedup, near_dedup, split, tokenizer, tokenize, write.

    Raises DataError for unusable input (too many rejects, nothing left, too few tokens
    for a split); every row rejected or dropped so far is written first, with its reason,
    and the error says where.
    """
    if profile.data.format != "text":
        # Instruction/chat records: one loss-masked sample per record (flywheel.sft.stage).
        from flywheel.sft.stage import prepare_records

        return prepare_records(profile, out_dir, progress, store=store, label=label)
    cfg = profile.data
    out_dir = Path(out_dir)
    # A missing or empty corpus, an output that would touch the source or a stranger's
    # files, or a base tokenizer that cannot load: all fail here, before Ray starts.
    endpoint_url = profile.storage.endpoint_url
    units = None if cfg.source.kind == "hf" else sources.list_units(cfg.source, endpoint_url)
    output.check_dataset_output(cfg, out_dir, store, label)
    seen = index.resolve(profile)  # the champion's dedup index (registry lookup), or None
    base = tokenizer.load_base(cfg.tokenizer.base) if cfg.tokenizer.base else None
    if store:
        work = output.Workspace(out_dir, "dataset", store=True)
    else:
        work = output.Workspace(out_dir.parent, out_dir.name, final=out_dir)
    run = _Run(profile, work.path, progress or progress_events.ignore, seen)

    def final() -> Path | None:
        if not store:
            return out_dir
        return out_dir / run.content_hash[:12] if run.content_hash else None

    try:
        return _finish(run, work, units, base, final)
    finally:
        if run.started_ray:  # a Ray it found running (a caller's session) stays up
            import ray

            ray.shutdown()


def _finish(
    run: _Run,
    work: output.Workspace,
    units: list[str] | None,
    base: Any,
    final: Callable[[], Path | None],
) -> DataStats:
    """Run the steps; publish the dataset, or keep what was judged and say where."""
    try:
        stats = run(units, base)
    except BaseException as exc:
        # A block that raised inside Ray arrives as Ray's exception with ours as text.
        message = None if isinstance(exc, FlywheelError) else schema.step_failure_message(exc)
        error: BaseException = DataError(message) if message else exc
        try:
            run.write_dropped()
            kept = work.fail(final(), str(error))
        except Exception:  # a full disk, a dead Ray: the original error is the one to report
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

    def __init__(
        self, profile: Profile, work: Path, report: Progress, seen: index.Seen | None = None
    ):
        self.profile = profile
        self.cfg = profile.data
        self.work = work
        self.report = report
        # (report file, Ray dataset of its rows): handles only, the rows stay in Ray.
        self.reports: list[tuple[str, object]] = []
        self.content_hash: str | None = None
        self.dropped_written = False
        self.seen = seen
        self.started_ray = False

    def write_dropped(self) -> None:
        """rejects.jsonl and dropped.jsonl from what was judged so far (a failed run keeps
        them too)."""
        if self.dropped_written or not self.reports:
            return
        with data_context():
            write_reports(self.reports, self.work)
        self.dropped_written = True

    def __call__(self, units: list[str] | None, base) -> DataStats:
        """The steps, writing into the working directory (`out_dir` below)."""
        profile, cfg, out_dir, report = self.profile, self.cfg, self.work, self.report
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        @contextlib.contextmanager
        def step(name: str) -> Iterator[dict]:
            info: dict = {}
            report(DataStepStarted(name))
            t0 = time.perf_counter()
            yield info
            timings[name] = round(time.perf_counter() - t0, 3)
            report(DataStepDone(name, timings[name], info))

        with step("ray"):
            self.started_ray = ensure_ray(profile.ray)

        with data_context():
            # -- read, normalize, quality, content key
            with step("read") as info:
                cleaned = read_documents(
                    cfg, units, clean_steps(cfg), profile.storage.endpoint_url
                ).materialize()
                judged = _counts(cleaned, ["dropped_by", "reason"])
                rows_read = int(judged["n"].sum())
                is_reject = judged["dropped_by"] == schema.READ
                reject_counts = _counts(
                    cleaned, ["source", "reason"], lambda b: b["dropped_by"] == schema.READ
                )
                content_hash = self.content_hash = _content_hash(
                    cfg, inputs=_digests_hash(cleaned), seen=index.seen_hash(self.seen)
                )
                info.update(rows=rows_read, rejected=int(judged.loc[is_reject, "n"].sum()))
            self.reports = [
                (artifacts.REJECTS, _where(cleaned, _rejected)),
                (DROPPED, _where(cleaned, _dropped)),
            ]
            check_rejects(reject_counts, rows_read, cfg.max_reject_share)
            if judged.loc[judged["reason"] == "", "n"].sum() == 0:
                raise DataError(
                    f"data.source: no document survived reading and filtering ({rows_read:,} "
                    f"rows read; {_reason_counts(judged)}); check data.filters and the source"
                )

            # -- exact + near dedup
            with step("dedup") as info:
                # Decided on keys, ids and signatures alone: the texts stay in `cleaned`
                # until the split pass applies every drop in one map.
                firsts = exact_firsts(cleaned, cfg)
                deduped = (
                    cleaned.select_columns([c for c in cleaned.columns() if c != "text"])
                    .map_batches(schema.keep_only, batch_format="pandas")
                    .map_batches(steps.MarkCopies(firsts), batch_format="pandas")
                    .materialize()
                )
                exact = _counts(deduped, ["dropped_by", "reason"], _judged)
                self.reports.append((DROPPED, _where(deduped, _dropped)))
                info.update(exact_duplicates=int(exact["n"].sum()))
            # The drops stay in Ray: ApplyDrops gets object refs, the driver only counts.
            apply_drops = steps.ApplyDrops()
            champion = index.read(self.seen) if self.seen is not None else None
            if champion is not None and cfg.dedup.exact:
                with step("champion_copies") as info:
                    copies = (
                        deduped.select_columns(["key", "reason", "source", "bucket"])
                        .map_batches(index.copy_key_rows, batch_format="pandas")
                        .union(champion.map_batches(index.index_key_rows, batch_format="pandas"))
                        .groupby("bucket")
                        .map_groups(index.copies, batch_format="pandas")
                        .materialize()
                    )
                    apply_drops.copy_tables = copies.to_arrow_refs()
                    info.update(champion_copies=copies.count())
            if cfg.dedup.near:
                with step("near_dedup") as info:
                    edges = near_duplicate_edges(deduped, cfg, self.seen)
                    n_edges = n_drops = 0
                    if edges is not None and (n_edges := edges.count()):
                        components = near_duplicate_components(edges)
                        n_drops = components.count()
                        refs = components.to_arrow_refs()
                        kept_ids = deduped.select_columns(["key", "id", "reason"]).map_batches(
                            _KeptIds(refs), batch_format="pandas"
                        )
                        if champion is not None:
                            kept_ids = kept_ids.union(
                                champion.select_columns(["key", "id"]).map_batches(
                                    index.id_rows, batch_format="pandas"
                                )
                            )
                        apply_drops.tables = refs
                        apply_drops.id_tables = kept_ids.materialize().to_arrow_refs()
                    info.update(candidate_edges=n_edges, near_duplicates=n_drops)

            # -- split
            with step("split") as info:
                final = (
                    cleaned.map_batches(schema.keep_only, batch_format="pandas")
                    .map_batches(
                        steps.MarkCopies(firsts), batch_format="pandas", batch_size=cfg.batch_size
                    )
                    .map_batches(schema.keep_only, batch_format="pandas")
                    .map_batches(
                        apply_drops,
                        batch_format="pandas",
                        batch_size=cfg.batch_size,
                    )
                    .map_batches(
                        steps.AssignSplit(cfg.split),
                        batch_format="pandas",
                        batch_size=cfg.batch_size,
                    )
                )
                # `minhash` stays for the dedup index (every later reader selects columns).
                final = final.materialize()
                near = _counts(final, ["dropped_by", "reason"], _judged)
                self.reports.append((DROPPED, _where(final, _dropped)))
                per_split = _counts(final, ["split"], lambda b: b["reason"] == "")
                split_docs = dict(zip(per_split["split"], per_split["n"].astype(int), strict=True))
                docs = {s: split_docs.get(s, 0) for s in artifacts.SPLITS}
                info.update(docs=docs)

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
                    share = tokenizer.sample_share(cfg.tokenizer, docs["train"])
                    train_texts = (
                        final.select_columns(["key", "split", "text", "reason"])
                        .map_batches(
                            _train_texts, fn_kwargs={"share": share}, batch_format="pandas"
                        )
                        .select_columns(["text"])
                        .materialize()
                    )
                    tok = tokenizer.train_bpe_in_ray(
                        train_texts, cfg.tokenizer, round(docs["train"] * share)
                    )
                info.update(trained_on_share=share if base is None else 0.0)
                tok_info = tokenizer.save(tok, tok_dir)
                info.update(vocab_size=tok_info["vocab_size"])

            # -- tokenize, then pack and write in Ray (see flywheel.data.shards)
            with step("tokenize") as info:
                tokens = (
                    final.select_columns(["key", "split", "text", "reason"])
                    .map_batches(schema.keep_only, batch_format="pandas")
                    .select_columns(["key", "split", "text"])
                    .map_batches(
                        steps.Tokenize(tok.backend_tokenizer.to_str()),
                        batch_format="pandas",
                        batch_size=cfg.batch_size,
                    )
                    .materialize()
                )
                stream = _key_part_tokens(tokens, artifacts.SPLITS)
                info.update(tokens=int(sum(v.sum() - docs[s] for s, v in stream.items())))

            with step("write") as info:
                seq_len = cfg.block_size
                plans = {}
                for split in artifacts.SPLITS:
                    total = int(stream[split].sum())
                    if total < seq_len and _share(cfg, split) > 0:
                        raise DataError(
                            f"data: the {split} split has {total - docs[split]:,} tokens, fewer "
                            f"than one sequence of data.block_size={seq_len}; add documents or "
                            "lower the block size"
                        )
                    if total:
                        plans[split] = shards.plan_shards(stream[split], seq_len)
                written = shards.gather_files(
                    tokens.map_batches(shards.AssignShards(plans), batch_format="pyarrow")
                    .groupby(["split", "shard"])
                    .map_groups(
                        shards.PackShard(plans, seq_len, tok_info["eos_token_id"]),
                        batch_format="pyarrow",
                    ),
                    out_dir,
                )
                splits: dict[str, dict] = {}
                for split in artifacts.SPLITS:
                    mine = written[written["split"] == split].sort_values("shard")
                    files = mine["file"].tolist()
                    if not files:  # an empty split still has its (empty) shard
                        name = shards.shard_name(split, 0)
                        shards.write_sequences(np.zeros((0, seq_len), np.int32), out_dir / name)
                        files = [name]
                    n = int(mine["sequences"].sum())
                    splits[split] = {
                        "docs": docs[split],
                        "tokens": n * seq_len,
                        "sequences": n,
                        "tail_tokens": int(stream[split].sum()) - n * seq_len,
                        "files": files,
                    }
                indexed = index.write(final, cfg.dedup, out_dir, content_hash)
                ref_keys = set(_reference_keys(final, cfg.reference_sample_docs))
                self.reports += [
                    (artifacts.TEST_TEXT, _where(final, _test_docs, text=True)),
                    (artifacts.REFERENCE_TEXT, _where(final, _keys_in(ref_keys), text=True)),
                ]
                rows = write_reports(self.reports, out_dir)
                self.dropped_written = True

                judged_all = pd.concat(
                    [judged[~is_reject & (judged["reason"] != "")], exact, near], ignore_index=True
                )
                rejected = judged.loc[is_reject].groupby("reason")["n"].sum().sort_index()
                by_source = reject_counts.groupby("source")["n"].sum().sort_index()
                dropped_by_reason = {
                    f"{name}:{reason}": int(n)
                    for name in schema.PIPELINE_STEPS
                    for reason, n in judged_all[judged_all["dropped_by"] == name]
                    .groupby("reason")["n"]
                    .sum()
                    .sort_index()
                    .items()
                }
                dropped = judged_all.groupby("dropped_by")["n"].sum()
                stats = DataStats(
                    content_hash=content_hash,
                    out_dir=str(out_dir),
                    docs_read=rows_read,
                    docs_kept=sum(docs.values()),
                    rejected={str(k): int(v) for k, v in rejected.items()},
                    rejected_by_source={str(k): int(v) for k, v in by_source.items()},
                    dropped={
                        b: int(dropped.get(b, 0)) for b in schema.PIPELINE_STEPS if b != schema.READ
                    },
                    dropped_by_reason=dropped_by_reason,
                    docs={s: v["docs"] for s, v in splits.items()},
                    tokens={s: v["tokens"] for s, v in splits.items()},
                    sequences={s: v["sequences"] for s, v in splits.items()},
                    tail_tokens={s: v["tail_tokens"] for s, v in splits.items()},
                    block_size=cfg.block_size,
                    vocab_size=tok_info["vocab_size"],
                    tokenizer_trained=not cfg.tokenizer.base,
                )
                manifest = _manifest(
                    cfg,
                    stats,
                    splits,
                    tok_info,
                    rows[artifacts.TEST_TEXT],
                    rows[artifacts.REFERENCE_TEXT],
                )
                manifest["dedup_index"] = {
                    "path": index.INDEX_DIR,
                    "docs": indexed,
                    "deduplicated_against": index.seen_hash(self.seen) or None,
                }
                # Written last: a directory with a manifest is a complete dataset.
                artifacts.DatasetManifest.model_validate(manifest).write(out_dir)
                info.update(sequences=stats.sequences)

        stats.seconds = round(time.perf_counter() - t_start, 3)
        stats.timings = timings
        return stats


def _rows(keep: Callable[[pd.DataFrame], pd.Series]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def rows(batch: pd.DataFrame) -> pd.DataFrame:
        return batch[keep(batch)]

    rows.__name__ = keep.__name__
    return rows


def _where(ds, keep: Callable[[pd.DataFrame], pd.Series], text: bool = False):
    """`ds` (materialized) rows where `keep(batch)` (vectorised; Ray's row-wise filter costs
    ~10 us a row), without the text unless `text`: a report line carries none, and turning
    every text into a Python string to drop it was most of the cost of a report."""
    unused = {"minhash"} if text else {"minhash", "text"}
    ds = ds.select_columns([c for c in ds.columns() if c not in unused])
    return ds.map_batches(_rows(keep), batch_format="pandas")


def _rejected(batch: pd.DataFrame) -> pd.Series:
    return batch["dropped_by"] == schema.READ


def _dropped(batch: pd.DataFrame) -> pd.Series:
    return (batch["reason"] != "") & (batch["dropped_by"] != schema.READ)


def _test_docs(batch: pd.DataFrame) -> pd.Series:
    return (batch["reason"] == "") & (batch["split"] == "test")


def _keys_in(keys: set[str]) -> Callable[[pd.DataFrame], pd.Series]:
    def keys_in(batch: pd.DataFrame) -> pd.Series:
        return batch["key"].isin(keys)

    return keys_in


def _reason_counts(counts: pd.DataFrame) -> str:
    """'quality too_short 38, read malformed_json 2': why rows went, most first.

    `counts`: rows per (`dropped_by`, `reason`) in column `n`."""
    judged = counts[counts["reason"] != ""]
    counts = judged["n"].groupby(judged["dropped_by"] + " " + judged["reason"]).sum().sort_index()
    counts = counts.sort_values(ascending=False, kind="stable")
    return ", ".join(f"{what} {n:,}" for what, n in counts.items()) or "nothing judged"


def _share(cfg: DataConfig, split: str) -> float:
    return {
        "train": 1 - cfg.split.validation_share - cfg.split.test_share,
        "validation": cfg.split.validation_share,
        "test": cfg.split.test_share,
    }[split]


def _train_texts(batch: pd.DataFrame, share: float = 1.0) -> pd.DataFrame:
    keep = (batch["reason"] == "") & (batch["split"] == "train")
    if share < 1.0:
        keep &= tokenizer.in_sample(batch["key"], share)
    return batch[keep]


def _manifest(
    cfg: DataConfig, stats: DataStats, splits: dict, tok_info: dict, n_test: int, n_ref: int
) -> dict:
    return artifacts.dataset_manifest(
        cfg,
        stats,
        pipeline_version=PIPELINE_VERSION,
        splits=splits,
        tok_info=tok_info,
        tokenizer={"base": cfg.tokenizer.base},
        text={
            "test": artifacts.TEST_TEXT,
            "test_docs": n_test,
            "reference": artifacts.REFERENCE_TEXT,
            "reference_docs": n_ref,
        },
        steps=_step_counts(stats),
        dropped={
            "file": DROPPED,
            "by_step": stats.dropped,
            "by_reason": stats.dropped_by_reason,
        },
    )


def _step_counts(stats: DataStats) -> list[dict]:
    """read / kept / dropped-by-reason per step, in pipeline order."""
    out = []
    n = stats.docs_read
    for name in schema.PIPELINE_STEPS:
        if name == schema.READ:
            dropped = dict(stats.rejected)
        else:
            prefix = f"{name}:"
            dropped = {
                k.removeprefix(prefix): v
                for k, v in stats.dropped_by_reason.items()
                if k.startswith(prefix)
            }
        kept = n - sum(dropped.values())
        out.append({"name": name, "read": n, "kept": kept, "dropped": dropped})
        n = kept
    return out
