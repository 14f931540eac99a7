"""Benchmark: the data stage's per-document steps on Ray Data vs HF datasets vs a plain loop.

    python scripts/bench/bench_data.py                 # 24,000 docs, writes bench-results/bench_data.json
    python scripts/bench/bench_data.py --docs 40000 --repeats 3 --no-prepare

Same corpus, same steps, same code in every engine: the blocks of `flywheel.data.blocks`
(normalize > quality filter > content key > MinHash signature > tokenize), applied to
pandas batches of `--batch-size` documents by

  * Ray Data      `map_batches(batch_format="pandas")` on a local Ray with `--cpus` CPUs;
  * HF datasets   `Dataset.map(batched=True, num_proc=--cpus)`;
  * plain loop    the same batches, one after another, in this process.

The ceiling is the raw `encode_batch` rate of the same tokenizer (Rust, all cores) on
the same texts: no engine can tokenize faster than that. Then, for context, the whole
stage (`flywheel.data.prepare`: + exact/near dedup with Ray groupbys, split, tokenizer
training, packing, writing) on the same corpus written as JSONL.

Corpus: the pydocs source (Python documentation shipped with the interpreter, ~8.5k
rows), cycled to `--docs`; copy k of a document has its paragraphs rotated by k, so
copies are near-duplicates (the full stage removes them; the per-document steps do the
same work on them as on any text). Each engine runs `--repeats` times; the table shows
the median of round-robin rounds (first rounds pay worker start-up and imports; every
run is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flywheel.config import DataConfig, SourceConfig, TokenizerConfig, load_profile
from flywheel.data import schema, sources, steps, tokenizer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_corpus(n_docs: int) -> pd.DataFrame:
    units = sources.list_units(SourceConfig(kind="pydocs"))
    base = sources.ReadUnits(SourceConfig(kind="pydocs"))(pd.DataFrame({"unit": units}))
    rows = []
    for i in range(n_docs):
        doc = base.iloc[i % len(base)]
        k = i // len(base)
        paras = doc["text"].split("\n\n")
        text = "\n\n".join(paras[k % len(paras) :] + paras[: k % len(paras)]) if k else doc["text"]
        rows.append(sources.doc_row(f"{doc['id']}#{k}", doc["source"], text))
    return schema.doc_frame(rows)


class Steps:
    """The per-document steps, composed: one pandas batch in, token ids out."""

    def __init__(self, cfg: DataConfig, tokenizer_json: str):
        self.blocks = [
            steps.Normalize(),
            steps.QualityFilter(cfg.filters),
            steps.ContentKey(),
            steps.MinHashSignature(cfg.dedup),
        ]
        self.tokenize = steps.Tokenize(tokenizer_json)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        for block in self.blocks:
            batch = block(batch)
        kept = schema.keep_only(batch).assign(split="train")
        return self.tokenize(kept)


def run_loop(corpus: pd.DataFrame, steps: Steps, batch_size: int) -> int:
    tokens = 0
    for start in range(0, len(corpus), batch_size):
        tokens += int(steps(corpus.iloc[start : start + batch_size].copy())["n_tokens"].sum())
    return tokens


def _hf_fn(batch: dict, steps: Steps) -> dict:
    # `batch` is a LazyBatch (a Mapping), which pandas does not read as columns.
    out = steps(pd.DataFrame({k: batch[k] for k in batch}))
    return {
        "key": out["key"].tolist(),
        "input_ids": out["input_ids"].tolist(),
        "n_tokens": out["n_tokens"].tolist(),
    }


def run_datasets(corpus: pd.DataFrame, steps: Steps, batch_size: int, procs: int) -> int:
    import datasets

    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_pandas(corpus, preserve_index=False)
    out = ds.map(
        _hf_fn,
        batched=True,
        batch_size=batch_size,
        num_proc=procs,
        fn_kwargs={"steps": steps},
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    return int(sum(out["n_tokens"]))


def run_ray(corpus: pd.DataFrame, steps: Steps, batch_size: int, cpus: int) -> int:
    import ray

    ds = ray.data.from_pandas([corpus.iloc[i :: 4 * cpus] for i in range(4 * cpus)])
    out = ds.map_batches(steps, batch_format="pandas", batch_size=batch_size).materialize()
    # Summed here, not with Dataset.sum: an aggregate is a shuffle that starts aggregator
    # actors (seconds on 2 cores) and is not part of the work being compared.
    return int(out.select_columns(["n_tokens"]).to_pandas()["n_tokens"].sum())


def run_ceiling(corpus: pd.DataFrame, tok) -> int:
    enc = tok.backend_tokenizer.encode_batch(list(corpus["text"]), add_special_tokens=False)
    return sum(len(e.ids) for e in enc)


def timed(fn, repeats: int) -> tuple[list[float], int]:
    times, result = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(round(time.perf_counter() - t0, 3))
    return times, result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--docs", type=int, default=24_000, help="corpus size (>= 20k for the recorded figures)"
    )
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs and datasets num_proc")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-prepare", action="store_true", help="skip the whole-stage run")
    ap.add_argument("--out", default="bench-results/bench_data.json")
    args = ap.parse_args()

    cfg = DataConfig()
    t0 = time.perf_counter()
    corpus = build_corpus(args.docs)
    print(
        f"corpus: {len(corpus):,} docs, {corpus['text'].str.len().sum():,} chars ({time.perf_counter() - t0:.1f}s)"
    )
    tok = tokenizer.train_bpe(
        corpus["text"].tolist(), TokenizerConfig(vocab_size=cfg.tokenizer.vocab_size)
    )
    steps = Steps(cfg, tok.backend_tokenizer.to_str())

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = round(time.perf_counter() - t0, 2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)

    results: dict[str, dict] = {}
    engines = {
        "tokenizer encode_batch (ceiling)": lambda: run_ceiling(corpus, tok),
        "plain loop (1 process)": lambda: run_loop(corpus, steps, args.batch_size),
        f"HF datasets map(batched, num_proc={args.cpus})": lambda: run_datasets(
            corpus, steps, args.batch_size, args.cpus
        ),
        f"Ray Data map_batches ({args.cpus} CPUs)": lambda: run_ray(
            corpus, steps, args.batch_size, args.cpus
        ),
    }
    # Round-robin rounds, median per engine: on a shared machine the load changes
    # minute to minute, and back-to-back runs of one engine would all catch the same spell.
    # One untimed warm-up per engine on 512 documents: Ray's first map starts worker
    # processes that import pandas/tokenizers/datasketch (seconds, once per process);
    # it is recorded in the JSON and is part of the whole-stage figure below.
    warmup: dict[str, float] = {}
    small = corpus.iloc[:512]
    for name, fn in {
        "plain loop (1 process)": lambda: run_loop(small, steps, args.batch_size),
        f"HF datasets map(batched, num_proc={args.cpus})": lambda: run_datasets(
            small, steps, args.batch_size, args.cpus
        ),
        f"Ray Data map_batches ({args.cpus} CPUs)": lambda: run_ray(
            small, steps, args.batch_size, args.cpus
        ),
    }.items():
        t0 = time.perf_counter()
        fn()
        warmup[name] = round(time.perf_counter() - t0, 3)
    print(f"  warm-up (512 docs): {warmup}")
    runs: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    for round_ in range(args.repeats):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            runs[name].append(round(time.perf_counter() - t0, 3))
        print(
            f"  round {round_ + 1}: "
            + ", ".join(f"{n.split(' ')[0]} {runs[n][-1]}s" for n in engines)
        )
    for name in engines:
        med = statistics.median(runs[name])
        results[name] = {
            "runs_s": runs[name],
            "median_s": med,
            "best_s": min(runs[name]),
            "docs_per_s": round(len(corpus) / med, 1),
            "tokens": tokens[name],
            "tokens_per_s": round(tokens[name] / med, 1),
        }

    base = results[f"HF datasets map(batched, num_proc={args.cpus})"]["median_s"]
    loop = results["plain loop (1 process)"]["median_s"]
    for r in results.values():
        r["speed_vs_datasets"] = round(base / r["median_s"], 2)
        r["speed_vs_loop"] = round(loop / r["median_s"], 2)

    prepare_result = None
    if not args.no_prepare:
        from flywheel.data import prepare

        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "corpus"
            src.mkdir()
            with (src / "corpus.jsonl").open("w") as f:
                for row in corpus.itertuples():
                    f.write(json.dumps({"id": row.id, "text": row.text}) + "\n")
            profile = load_profile(
                None,
                ["data.source.kind=files", f"data.source.path={src}", "data.source.id_field=id"],
            )
            stats = prepare(profile, Path(tmp) / "out")
        prepare_result = {
            "seconds": stats.seconds,
            "docs_per_s": round(len(corpus) / stats.seconds, 1),
            "timings": stats.timings,
            "docs_kept": stats.docs_kept,
            "dropped": stats.dropped,
            "tokens": sum(stats.tokens.values()),
        }

    header = f"{'engine':<44}{'median s':>9}{'docs/s':>10}{'tokens/s':>12}{'vs datasets':>13}{'vs loop':>9}"
    print()
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<44}{r['median_s']:>9.2f}{r['docs_per_s']:>10,.0f}{r['tokens_per_s']:>12,.0f}"
            f"{r['speed_vs_datasets']:>12.2f}x{r['speed_vs_loop']:>8.2f}x"
        )
    print(f"(ray.init: {ray_init_s}s, not included; load average at end: {os.getloadavg()[0]:.1f})")
    if prepare_result:
        print(
            f"whole stage, flywheel.data.prepare: {prepare_result['seconds']:.1f}s "
            f"({prepare_result['docs_per_s']:,.0f} docs/s), steps: {prepare_result['timings']}; "
            f"kept {prepare_result['docs_kept']:,}, dropped {prepare_result['dropped']}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "corpus_docs": len(corpus),
                "corpus_chars": int(corpus["text"].str.len().sum()),
                "cpus": args.cpus,
                "batch_size": args.batch_size,
                "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
                "ray_init_s": ray_init_s,
                "warmup_512_docs_s": warmup,
                "load_average_end": os.getloadavg()[0],
                "engines": results,
                "prepare": prepare_result,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
