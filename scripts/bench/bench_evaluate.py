"""Evaluation throughput: flywheel's batched scorer vs a naive per-window loop.

    python scripts/bench/bench_evaluate.py                    # the local profile's model shape
    python scripts/bench/bench_evaluate.py --docs 100 --batch-sizes 1 8 32

Baseline (measured in the same run, on the same windows): one forward per window under
`torch.no_grad`, loss from the logits -- what a first evaluation loop usually looks like.
Both must give the same perplexity (checked); the table shows tokens/s and the ratio to
the baseline (one untimed warm-up pass each, then --repeat round-robin rounds, median). A fresh model of the profile's shape (GPT-2,
`model.*`, vocabulary `data.tokenizer.vocab_size`) is scored on held-out pydoc paragraphs
(the test fixture builders), so the script needs no prepared data and no network.
Writes bench-results/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # fixture builders: tokenizer, model, held-out split


def baseline(model, tokenizer, texts, context, max_tokens) -> tuple[float, int, float]:
    import torch

    from flywheel.evaluate.core import _chunks

    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = _chunks(ids, [tokenizer.eos_token_id], context, max_tokens)
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, seq in chunks:
            x = torch.tensor([seq])
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:])
            nll += float(loss) * (len(seq) - 1)
            n += len(seq) - 1
    return time.perf_counter() - t0, n, math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=170, help="held-out documents (max 170)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: steadier on a shared box)",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (median kept)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "evaluate.json")
    args = ap.parse_args()

    import torch
    from fixtures_models import split_paragraphs, train_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from flywheel.config import load_profile
    from flywheel.evaluate.core import score_documents
    from flywheel.evaluate.metrics import point_metrics

    torch.set_num_threads(args.threads)
    profile = load_profile()
    train, test = split_paragraphs()
    texts = test[: args.docs]
    tok = train_tokenizer(train, profile.data.tokenizer.vocab_size)
    m = profile.model
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=m.n_layer,
            n_embd=m.n_embd,
            n_head=m.n_head,
            n_positions=m.context,
            vocab_size=len(tok),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    cap = profile.eval.max_tokens_per_doc

    def ours(bs: int):
        cfg = profile.eval.model_copy(update={"batch_size": bs})
        t0 = time.perf_counter()
        sums = score_documents(model, tok, texts, cfg, "cpu")
        return time.perf_counter() - t0, int(sums.tokens.sum()), point_metrics(sums.kept())[0]

    methods = {
        ("baseline: one window per forward", 1): lambda: baseline(model, tok, texts, m.context, cap)
    }
    for bs in args.batch_sizes:
        methods[("flywheel score_documents", bs)] = lambda bs=bs: ours(bs)
    for fn in methods.values():
        fn()  # warm-up: allocator, kernels
    # Round-robin, median: on a shared machine a burst of load then hits every method alike.
    times: dict[tuple[str, int], list[float]] = {k: [] for k in methods}
    results = {}
    for _ in range(args.repeat):
        for key, fn in methods.items():
            secs, n, ppl = fn()
            times[key].append(secs)
            results[key] = (n, ppl)
    base_key = next(iter(methods))
    n_tokens, base_ppl = results[base_key]
    base_s = statistics.median(times[base_key])
    rows = []
    for key in methods:
        n, ppl = results[key]
        assert n == n_tokens, "both methods must score the same tokens"
        assert abs(ppl - base_ppl) / base_ppl < 1e-3, (ppl, base_ppl)
        secs = statistics.median(times[key])
        rows.append(
            {
                "method": key[0],
                "batch": key[1],
                "seconds": secs,
                "tokens_per_s": n_tokens / secs,
                "perplexity": ppl,
                "speedup": base_s / secs,
            }
        )

    # The whole public call (load, score, 200 bootstrap resamples) for the same documents.
    from fixtures_models import build_eval_dataset

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m")
        tok.save_pretrained(Path(tmp) / "m")
        ds = build_eval_dataset(Path(tmp) / "ds", max_docs=args.docs)
        from flywheel.evaluate import evaluate

        t0 = time.perf_counter()
        rep = evaluate(profile, Path(tmp) / "m", ds)
        full_s = time.perf_counter() - t0

    print(
        f"\nevaluation: {len(texts)} docs, {n_tokens:,} tokens, GPT-2 {m.n_layer}x{m.n_embd} "
        f"ctx {m.context} vocab {len(tok)}, {args.threads} threads\n"
    )
    print(f"{'method':32} {'batch':>5} {'seconds':>8} {'tokens/s':>10} {'ppl':>9} {'x base':>7}")
    for r in rows:
        print(
            f"{r['method']:32} {r['batch']:>5} {r['seconds']:>8.2f} {r['tokens_per_s']:>10,.0f} "
            f"{r['perplexity']:>9.2f} {r['speedup']:>7.2f}"
        )
    print(
        f"\nevaluate() end to end (batch {profile.eval.batch_size}, "
        f"{profile.eval.bootstrap_samples} bootstrap resamples): {full_s:.2f}s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "evaluate",
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "docs": len(texts),
        "tokens": n_tokens,
        "model": {
            "n_layer": m.n_layer,
            "n_embd": m.n_embd,
            "context": m.context,
            "vocab": len(tok),
        },
        "rows": rows,
        "evaluate_end_to_end_s": full_s,
        "report_perplexity": rep.perplexity,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
