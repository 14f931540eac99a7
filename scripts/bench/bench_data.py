"""Benchmark: the whole data stage at corpus scale, beside its ceiling and two peers.

    python scripts/bench/bench_data.py --docs 20000,200000     # writes bench-results/bench_data.json
    python scripts/bench/bench_data.py --docs 20000 --no-peers

For each corpus size, on the same generated corpus (unique ~1.3 KB documents of words drawn
from the pydoc topics' vocabulary, written as 8 JSONL files) and the same `--cpus`:

  * the stage      `flywheel.data.prepare` with `data.source.kind=files`, in a fresh
                   process (so its peak RSS is the driver's own): wall, docs/s, tokens/s,
                   driver peak RSS (VmHWM), its RSS after each step, and per-step timings;
  * given tokenizer the stage again with `data.tokenizer.base` = the tokenizer the first
                   run trained: the stage without its BPE training pass, which pre-tokenizes
                   every train text once more (skip with --no-given-tokenizer);
  * BPE on all     the stage with `data.tokenizer.train_docs=null`: the BPE trains on every
                   train document instead of the default 50k-document content-hash sample
                   (run where the corpus is larger than that; --no-bpe-all skips it); its
                   token count beside the default's says what the sample costs in compression;
  * the ceiling    the stage's own tokenizer, `encode_batch` over the same texts in one call
                   (Rust, all cores), the issue's reference, in a fresh process, best of two
                   runs; beside it `encode_batch_fast` in 256-document calls (no offsets, what
                   the stage calls), the fastest it encodes them here: a stricter ceiling;
  * HF datasets    `Dataset.map(batched=True, num_proc=--cpus)` over the same per-document
                   steps (normalize > quality > content key > MinHash > tokenize);
  * datatrove      its MinHash dedup pipeline (signatures > buckets > clusters > filter) with
                   `LocalPipelineExecutor(tasks=workers=--cpus)`, the peer users pick for
                   near-duplicate removal (`pip install -e .[bench]`); skipped if absent.

Then union-find vs `scipy.sparse.csgraph.connected_components` on the same synthetic edge
lists (the stage's near-duplicate clustering). Targets (issue 17): driver RSS at the largest
size <= 1.2 x at the smallest; stage docs/s at the largest >= 0.6 x the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

FILES = 8


# ----------------------------------------------------------------------- corpus


def generate(n_docs: int, out_dir: Path, seed: int = 17) -> int:
    """Write `n_docs` unique documents (~1.3 KB: 150-260 words in sentences and paragraphs)
    as FILES JSONL files; returns the characters written."""
    from pydoc_data.topics import topics

    words = re.findall(r"[A-Za-z]+", " ".join(topics[k] for k in sorted(topics)))
    vocab, counts = np.unique(np.array(words), return_counts=True)
    p = counts / counts.sum()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [(out_dir / f"corpus-{i:02d}.jsonl").open("w") for i in range(FILES)]
    chars = 0
    for start in range(0, n_docs, 1000):
        m = min(1000, n_docs - start)
        lens = rng.integers(150, 260, size=m)
        drawn = vocab[rng.choice(len(vocab), size=int(lens.sum()), p=p)]
        pos = 0
        for j, n in enumerate(lens):
            w = drawn[pos : pos + n]
            pos += n
            sents = [" ".join(w[k : k + 15]).capitalize() + "." for k in range(0, n, 15)]
            text = "\n\n".join("  ".join(sents[k : k + 4]) for k in range(0, len(sents), 4))
            chars += len(text)
            doc = {"id": f"doc-{start + j:08d}", "text": text}
            files[(start + j) % FILES].write(json.dumps(doc) + "\n")
    for f in files:
        f.close()
    return chars


def texts_of(corpus: Path) -> list[str]:
    texts = []
    for path in sorted(corpus.glob("*.jsonl")):
        with path.open() as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


# ------------------------------------------------------------------------ stage


def stage_child(corpus: str, out: str, cpus: int, *extra: str) -> None:
    """Run inside a fresh process: the stage, then one JSON line with its numbers."""
    from flywheel.config import load_profile
    from flywheel.data import prepare

    profile = load_profile(
        None,
        [
            "data.source.kind=files",
            f"data.source.path={corpus}",
            "data.source.id_field=id",
            f"ray.num_cpus={cpus}",
            *extra,
        ],
    )
    from flywheel.progress import DataStepDone

    step_rss: dict[str, int] = {}

    def progress(event) -> None:
        if isinstance(event, DataStepDone):
            step_rss[event.step] = _status_bytes("VmRSS")

    t0 = time.perf_counter()
    stats = prepare(profile, Path(out), progress)
    wall = time.perf_counter() - t0
    # VmHWM, not getrusage's ru_maxrss: ru_maxrss survives execve, so a child started by
    # a parent holding 200k texts reports the parent's peak (that was the 1.13 GB measured
    # at 200k before); VmHWM belongs to this process's own address space.
    rss = _status_bytes("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": round(wall, 2),
                "driver_peak_rss_bytes": rss,
                "timings": stats.timings,
                "rss_after_step_bytes": step_rss,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "docs_kept": stats.docs_kept,
                "tokens": sum(stats.tokens.values()),
                "tokens_all": sum(stats.tokens.values()) + sum(stats.tail_tokens.values()),
                "dropped": stats.dropped,
            }
        ),
        flush=True,
    )


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (Linux, in kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(what: str, *args: str) -> dict:
    """Run this script as `--child-<what> ARGS` in a fresh process; its RESULT line."""
    cmd = [sys.executable, __file__, f"--child-{what}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"the {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_stage(corpus: Path, out: Path, cpus: int, *extra: str) -> dict:
    return _child("stage", str(corpus), str(out), str(cpus), *extra)


# ------------------------------------------------------------------------ peers


CHUNK = 256  # documents per call in the chunked ceiling: the stage's batch size


def run_ceiling(corpus: Path, tokenizer_dir: Path) -> dict:
    """The tokenizer's own rate, each way in a fresh process of its own, best of two runs:
    - `encode_batch` over the whole corpus in one call: issue 17's ceiling;
    - `encode_batch_fast` in CHUNK-document calls: the fastest this tokenizer encodes these
      texts here (a stricter ceiling).
    Separate processes: after one whole-corpus call (200k documents: ~5 GB of encodings),
    the same process took 112 s for the chunked pass that takes 25-30 s in a fresh one."""
    whole = _child("ceiling", str(corpus), str(tokenizer_dir), "whole")
    chunked = _child("ceiling", str(corpus), str(tokenizer_dir), "chunked")
    return {
        "seconds": whole["seconds"],
        "chunked_seconds": chunked["seconds"],
        "runs": {"encode_batch": whole["runs"], "encode_batch_fast_chunked": chunked["runs"]},
        "tokens": whole["tokens"],
    }


def ceiling_child(corpus: str, tokenizer_dir: str, how: str) -> None:
    from tokenizers import Tokenizer

    texts = texts_of(Path(corpus))
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))

    def whole() -> int:
        enc = tok.encode_batch(texts, add_special_tokens=False)
        return sum(len(e.ids) for e in enc)

    def chunked() -> int:
        n = 0
        for i in range(0, len(texts), CHUNK):
            part = tok.encode_batch_fast(texts[i : i + CHUNK], add_special_tokens=False)
            n += sum(len(e.ids) for e in part)
        return n

    fn = whole if how == "whole" else chunked
    runs, tokens = [], 0
    for _ in range(2):
        t0 = time.perf_counter()
        tokens = fn()
        runs.append(time.perf_counter() - t0)
    result = {"seconds": round(min(runs), 2), "runs": [round(x, 2) for x in runs], "tokens": tokens}
    print("RESULT " + json.dumps(result), flush=True)


class Steps:
    """The stage's per-document steps, composed: a pandas batch in, token counts out."""

    def __init__(self, tokenizer_json: str):
        from flywheel.config import DataConfig
        from flywheel.data import steps

        cfg = DataConfig()
        self.steps = [
            steps.Normalize(),
            steps.QualityFilter(cfg.filters),
            steps.ContentKey(),
            steps.MinHashSignature(cfg.dedup),
        ]
        self.tokenize = steps.Tokenize(tokenizer_json)

    def __call__(self, batch: dict) -> dict:
        from flywheel.data import schema, sources

        frame = schema.doc_frame(
            [
                sources.doc_row(i, "bench", t)
                for i, t in zip(batch["id"], batch["text"], strict=True)
            ]
        )
        for step in self.steps:
            frame = step(frame)
        kept = schema.keep_only(frame).assign(split="train")
        table = self.tokenize(kept)
        return {"n_tokens": [sum(table["n_tokens"].to_pylist())]}


def run_datasets(texts: list[str], tokenizer_dir: Path, procs: int) -> dict:
    import datasets

    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok_json = (tokenizer_dir / "tokenizer.json").read_text()
    ds = datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    t0 = time.perf_counter()
    out = ds.map(
        Steps(tok_json),
        batched=True,
        batch_size=256,
        num_proc=procs,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    tokens = int(sum(out["n_tokens"]))
    return {"seconds": round(time.perf_counter() - t0, 2), "tokens": tokens}


def run_datatrove(corpus: Path, work: Path, cpus: int) -> dict | None:
    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter
        from datatrove.utils.hashing import HashConfig
    except ImportError:
        return None
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        """Our word definition (`\\w+`). Its English default needs spaCy and a model download;
        a WordTokenizer passed in is its documented way to use another."""

        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    # 16 bands x 8 rows = 128 hashes of 5-grams, as close as its config gets to ours (32 x 4).
    # sha1: its xxhash path hands str to xxhash 4, which takes only bytes (TypeError).
    config = MinhashConfig(
        n_grams=5, num_buckets=16, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1")
    )
    from loguru import logger

    logger.remove()  # its per-task INFO lines would bury the table
    logger.add(sys.stderr, level="WARNING")
    reader = JsonlReader(str(corpus), glob_pattern="*.jsonl")
    # Each executor logs under the bench's work dir: left at None, datatrove writes
    # ./logs/<timestamp> into whatever directory the bench was started from.
    common = {"workers": cpus, "skip_completed": False}
    t0 = time.perf_counter()
    stages = [
        LocalPipelineExecutor(
            [reader, MinhashDedupSignature(str(work / "sigs"), config=config, language=Words())],
            tasks=cpus,
            logging_dir=str(work / "logs" / "signatures"),
            **common,
        ),
        LocalPipelineExecutor(
            [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
            tasks=config.num_buckets,
            logging_dir=str(work / "logs" / "buckets"),
            **common,
        ),
        LocalPipelineExecutor(
            [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
            tasks=1,
            workers=1,
            logging_dir=str(work / "logs" / "cluster"),
            skip_completed=False,
        ),
        LocalPipelineExecutor(
            [
                JsonlReader(str(corpus), glob_pattern="*.jsonl"),
                MinhashDedupFilter(str(work / "remove")),
                JsonlWriter(str(work / "out")),
            ],
            tasks=cpus,
            logging_dir=str(work / "logs" / "filter"),
            **common,
        ),
    ]
    for executor in stages:
        executor.run()
    return {"seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------ union-find


def scipy_components(edges) -> dict[str, str]:
    """The alternative issue 12 asked to measure: scipy's connected_components, keys
    numbered with pandas, the smallest key of each component kept (same result)."""
    import pandas as pd
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(edges)
    codes, keys = pd.factorize(pd.concat([edges["a"], edges["b"]], ignore_index=True))
    graph = coo_matrix((np.ones(n, dtype=np.int8), (codes[:n], codes[n:])), shape=(len(keys),) * 2)
    _, label = connected_components(graph, directed=False)
    names = pd.Series(np.asarray(keys, dtype=object))
    kept = names.groupby(label).transform("min")
    moved = (kept != names).to_numpy()
    return dict(zip(names[moved].tolist(), kept[moved].tolist(), strict=True))


def bench_components(n_edges: int) -> dict:
    import pandas as pd

    from flywheel.data.steps import duplicate_components

    rng = np.random.default_rng(0)
    # Clusters of 2-6 documents, like near-duplicate families; keys are 32-hex hashes.
    keys = np.array([f"{x:032x}" for x in rng.integers(0, 2**63, size=n_edges * 2)])
    sizes = rng.integers(2, 7, size=n_edges)
    a, b, pos = [], [], 0
    for s in sizes:
        if len(a) >= n_edges or pos + s > len(keys):
            break
        fam = keys[pos : pos + s]
        pos += s
        for j in range(1, s):
            a.append(fam[rng.integers(0, j)])
            b.append(fam[j])
    edges = pd.DataFrame({"a": a, "b": b})
    t0 = time.perf_counter()
    ref = duplicate_components(edges)  # the stage's union-find
    t_uf = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = scipy_components(edges)
    t_sp = time.perf_counter() - t0
    assert got == ref, "scipy components differ from union-find"
    return {"edges": len(a), "union_find_s": round(t_uf, 3), "scipy_s": round(t_sp, 3)}


# ------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", default="20000,200000", help="comma-separated corpus sizes")
    ap.add_argument(
        "--cpus", type=int, default=2, help="Ray CPUs, datasets num_proc, datatrove workers"
    )
    ap.add_argument("--no-peers", action="store_true", help="only the stage and the ceiling")
    ap.add_argument(
        "--no-given-tokenizer",
        action="store_true",
        help="skip the second stage run with data.tokenizer.base = the first run's tokenizer "
        "(the stage without training its BPE, which reads every train text once more)",
    )
    ap.add_argument(
        "--no-bpe-all",
        action="store_true",
        help="skip the stage run with data.tokenizer.train_docs=null (BPE on every document)",
    )
    ap.add_argument("--edges", type=int, default=200_000, help="edges for the clustering bench")
    ap.add_argument("--out", default="bench-results/bench_data.json")
    args = ap.parse_args()

    from flywheel.config import TokenizerConfig

    sizes = [int(x) for x in args.docs.split(",")]
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus"
            chars = generate(n, corpus)
            stage = run_stage(corpus, Path(tmp) / "out", args.cpus)
            texts = texts_of(corpus)
            row: dict = {"docs": n, "chars": chars, "stage": stage}
            if not args.no_given_tokenizer:  # the stage without its BPE training pass
                given = f"data.tokenizer.base={Path(tmp) / 'out' / 'tokenizer'}"
                row["stage_given_tokenizer"] = run_stage(
                    corpus, Path(tmp) / "out-given", args.cpus, given
                )
            if not args.no_bpe_all and n > TokenizerConfig().train_docs:
                row["stage_bpe_all"] = run_stage(
                    corpus, Path(tmp) / "out-bpe-all", args.cpus, "data.tokenizer.train_docs=null"
                )
            row["ceiling"] = run_ceiling(corpus, Path(tmp) / "out" / "tokenizer")
            if not args.no_peers:
                row["datasets"] = run_datasets(texts, Path(tmp) / "out" / "tokenizer", args.cpus)
                row["datatrove"] = run_datatrove(corpus, Path(tmp) / "dt", args.cpus)
            for name in (
                "stage",
                "stage_given_tokenizer",
                "stage_bpe_all",
                "ceiling",
                "datasets",
                "datatrove",
            ):
                if row.get(name):
                    row[name]["docs_per_s"] = round(n / row[name]["seconds"], 1)
            row["stage_vs_ceiling"] = round(
                row["stage"]["docs_per_s"] / row["ceiling"]["docs_per_s"], 3
            )
            row["stage_vs_chunked_ceiling"] = round(
                row["ceiling"]["chunked_seconds"] / row["stage"]["seconds"], 3
            )
            if row.get("stage_bpe_all"):
                row["bpe_all_vs_ceiling"] = round(
                    row["stage_bpe_all"]["docs_per_s"] / row["ceiling"]["docs_per_s"], 3
                )
                # Tokens of the default (sampled BPE) over those of the BPE trained on all.
                row["sampled_bpe_tokens_ratio"] = round(
                    row["stage"]["tokens_all"] / row["stage_bpe_all"]["tokens_all"], 5
                )
            results.append(row)
            print(json.dumps(row), flush=True)

    components = bench_components(args.edges)

    print()
    header = (
        f"{'docs':>8} {'stage s':>8} {'docs/s':>7} {'tok/s':>9} {'RSS GB':>7} "
        f"{'ceiling docs/s':>15} {'x ceil':>7} {'given-tok docs/s':>17} {'datasets docs/s':>16} "
        f"{'datatrove docs/s':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        st = r["stage"]
        print(
            f"{r['docs']:>8,} {st['seconds']:>8.1f} {st['docs_per_s']:>7,.0f} "
            f"{st['tokens_all'] / st['seconds']:>9,.0f} {st['driver_peak_rss_bytes'] / 1e9:>7.2f} "
            f"{r['ceiling']['docs_per_s']:>15,.0f} {r['stage_vs_ceiling']:>7.2f} "
            f"{(r.get('stage_given_tokenizer') or {}).get('docs_per_s', float('nan')):>17,.0f} "
            f"{(r.get('datasets') or {}).get('docs_per_s', float('nan')):>16,.0f} "
            f"{(r.get('datatrove') or {}).get('docs_per_s', float('nan')):>17,.0f}"
        )
    if len(results) > 1:
        ratio = (
            results[-1]["stage"]["driver_peak_rss_bytes"]
            / results[0]["stage"]["driver_peak_rss_bytes"]
        )
        print(f"driver RSS, largest / smallest: {ratio:.2f} (target <= 1.2)")
    print(
        f"stage vs ceiling at the largest size: {results[-1]['stage_vs_ceiling']:.2f} (target >= 0.6)"
    )
    last = results[-1]
    print(
        f"stage vs the chunked encode_batch_fast ceiling ({CHUNK}-document calls): "
        f"{last['stage_vs_chunked_ceiling']:.2f}"
    )
    if "bpe_all_vs_ceiling" in last:
        print(
            f"the same with the BPE trained on all documents: {last['bpe_all_vs_ceiling']:.2f}; "
            f"tokens, default sample / all: {last['sampled_bpe_tokens_ratio']:.5f}"
        )
    print(
        f"clustering {components['edges']:,} edges: union-find {components['union_find_s']}s, "
        f"scipy connected_components {components['scipy_s']}s"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
                "cpus": args.cpus,
                "sizes": results,
                "components": components,
                "load_average_end": os.getloadavg()[0],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--child-stage":
        stage_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
    elif len(sys.argv) == 5 and sys.argv[1] == "--child-ceiling":
        ceiling_child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
