"""Benchmark: how often the gate promotes, under each mode, when it should and when it
should not.

    python scripts/bench/bench_gate.py                        # defaults below
    python scripts/bench/bench_gate.py --seeds 6 --replicates 1000 --docs 170 1000

Part 1, real tiny models (tests/fixtures_models.py: 2-layer GPT-2, vocabulary 512, pydoc
paragraphs; 170 held-out documents scored by `flywheel.evaluate.evaluate`):

  * from scratch: `--seeds` models trained `--steps` AdamW steps (lr 1e-2), each from
    its own seed (init and data order). Every ordered pair (challenger, champion) is a
    "same recipe, different seed" pair.
  * warm-start retrain: seed 0's model trained `--retrain-steps` more steps at lr 1e-3
    with data order from seeds 1..N: the production retrain, N times. Ordered pairs of
    retrains are again "same recipe, different seed"; each retrain against its parent is
    a real (small, ~1%) improvement.
  * trained longer: each from-scratch model trained `--longer` more steps; against every
    other seed's `--steps` model, a real (large) improvement.

Part 2, evaluation noise alone, many times (synthetic pairs from real per-document
losses): a "population" of documents is the 170 real ones with the champion's per-document
bits and bytes; the challenger differs from it on each document by the relative
difference observed between two real models (two from-scratch seeds: models that differ
document by document; or two retrain seeds: nearly the same model), times a true shift
(1 + delta). Each replicate draws a held-out split of n documents from the population
(with replacement) and runs `decide_promotion`. Two nulls (delta = 0, the challenger
exactly as good as the champion, so any promotion under superiority is a false one):
"sign-flip" gives each sampled document's difference a random sign (the two models are
exchangeable on every document: noise); "centred" subtracts the byte-weighted mean
difference (the challenger better on most documents, worse on a few, equal overall).

Each table gives promotion rates under: the previous rule (promote when the challenger's
point estimate is no worse: `min_relative_improvement: 0`, margin 0; for one tokenizer the
same as comparing perplexities), `gate.mode: superiority` (with
`min_relative_improvement` 0 and 0.005) and `gate.mode: non_inferiority` (margin 0), all
at the default confidence 0.95. Writes bench-results/gate.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# Column -> gate.* settings; "previous" is the rule before the paired gate.
MODES = {
    "previous": None,
    "superiority": {},
    "superiority_0.5%": {"min_relative_improvement": 0.005},
    "non_inferiority": {"mode": "non_inferiority"},
}


def promoted(challenger, champion, mode: str) -> bool:
    from flywheel.config import GatePolicy
    from flywheel.gate import decide_promotion

    if MODES[mode] is None:
        # The old default: the point estimate no worse than the champion's.
        return challenger.bits_per_byte <= champion.bits_per_byte
    return decide_promotion(challenger, champion, GatePolicy(**MODES[mode])).promote


def rates(pairs, mode: str) -> float:
    return sum(promoted(a, b, mode) for a, b in pairs) / len(pairs)


def real_models(args, root: Path) -> dict:
    import torch
    from fixtures_models import (
        build_eval_dataset,
        fresh_model,
        save_model,
        split_paragraphs,
        train_steps,
        train_tokenizer,
    )

    from flywheel.config import Profile
    from flywheel.evaluate import evaluate

    torch.set_num_threads(args.threads)
    train, _ = split_paragraphs()
    tok = train_tokenizer(train)
    ds = build_eval_dataset(root / "ds", max_docs=200)
    profile = Profile(eval={"max_docs": 200, "bootstrap_samples": 0})

    def score(model, name):
        return evaluate(profile, save_model(model, tok, root / name), ds)

    scratch, longer, retrain = [], [], []
    t0 = time.perf_counter()
    parent = None
    for seed in range(args.seeds):
        model = fresh_model(tok, seed=seed)
        train_steps(model, tok, train, args.steps, seed=seed)
        scratch.append(score(model, f"scratch{seed}"))
        if seed == 0:
            parent = copy.deepcopy(model)
        train_steps(model, tok, train, args.longer, seed=seed)
        longer.append(score(model, f"longer{seed}"))
        print(
            f"  seed {seed}: {args.steps} steps {scratch[-1].bits_per_byte:.4f} bits/byte, "
            f"+{args.longer} steps {longer[-1].bits_per_byte:.4f}",
            flush=True,
        )
    for seed in range(1, args.seeds + 1):
        model = copy.deepcopy(parent)
        train_steps(model, tok, train, args.retrain_steps, seed=seed, lr=1e-3)
        retrain.append(score(model, f"retrain{seed}"))
    print(f"  trained and scored {3 * args.seeds} models in {time.perf_counter() - t0:.0f}s")

    def ordered(models):
        return list(itertools.permutations(models, 2))

    cases = {
        "from scratch, two seeds (same recipe)": (ordered(scratch), "none"),
        "warm-start retrain, two seeds (same recipe)": (ordered(retrain), "none"),
        "warm-start retrain vs its parent (~1% better)": (
            [(r, scratch[0]) for r in retrain],
            "promote",
        ),
        "trained longer vs another seed (large gain)": (
            [(lg, sc) for i, lg in enumerate(longer) for j, sc in enumerate(scratch) if i != j],
            "promote",
        ),
    }
    rows = []
    for name, (pairs, want) in cases.items():
        rel = [(a.bits_per_byte - b.bits_per_byte) / b.bits_per_byte for a, b in pairs]
        row = {
            "case": name,
            "should": want,
            "pairs": len(pairs),
            "median_abs_rel_diff": statistics.median(abs(r) for r in rel),
        }
        row.update({mode: rates(pairs, mode) for mode in MODES})
        rows.append(row)
    t0 = time.perf_counter()
    from flywheel.config import GatePolicy
    from flywheel.gate import decide_promotion

    for _ in range(20):
        decide_promotion(retrain[0], retrain[1], GatePolicy())
    gate_ms = (time.perf_counter() - t0) / 20 * 1000
    return {"rows": rows, "scratch": scratch, "retrain": retrain, "gate_ms": gate_ms}


def synthetic(args, champion, other, pool: str, null: str, deltas: list[float]) -> list[dict]:
    """Promotion rates over replicated held-out splits drawn from a document population;
    the per-document differences come from `other` against `champion` (named `pool`).

    null "sign-flip": each sampled document's difference gets a random sign, so the two
    models are exchangeable on every document (noise around an equal model). null
    "centred": the observed differences minus their byte-weighted mean, so the
    challenger is better on most documents and worse on a few, equal on the population.
    """
    import numpy as np

    from flywheel.evaluate.report import DocScores

    bits = np.array(champion.docs.bits)
    nbytes = np.array(champion.docs.bytes)
    tokens = np.array(champion.docs.tokens)
    correct = np.array(champion.docs.correct)
    at = {d: i for i, d in enumerate(other.docs.ids)}
    j = np.array([at[d] for d in champion.docs.ids])
    # Per-document relative difference between two real seeds, centred: on the population
    # the challenger then spends exactly as many bits as the champion (before delta).
    rel = np.array(other.docs.bits)[j] / bits - 1.0
    if null == "centred":
        rel -= np.sum(rel * bits) / np.sum(bits)
    rng = np.random.default_rng(args.seed)

    def report(sel, doc_bits):
        return champion.model_copy(
            update={
                "bits_per_byte": float(doc_bits.sum() / nbytes[sel].sum()),
                "docs": DocScores(
                    ids=[f"d{k}" for k in range(len(sel))],
                    bits=doc_bits.tolist(),
                    bytes=nbytes[sel].tolist(),
                    tokens=tokens[sel].tolist(),
                    correct=correct[sel].tolist(),
                ),
                # Accuracy is not what this measures: different fingerprints skip it.
                "tokenizer": None,
            }
        )

    rows = []
    for n in args.docs:
        for delta in deltas:
            counts = dict.fromkeys(MODES, 0)
            for _ in range(args.replicates):
                sel = rng.integers(0, len(bits), n)
                noise = rel[sel]
                if null == "sign-flip":
                    noise = noise * rng.choice([-1.0, 1.0], n)
                cp = report(sel, bits[sel])
                ch = report(sel, bits[sel] * (1.0 + noise) * (1.0 + delta))
                for mode in MODES:
                    counts[mode] += promoted(ch, cp, mode)
            row = {
                "pool": pool,
                "null": null,
                "docs": n,
                "true_rel_diff": delta,
                "replicates": args.replicates,
            }
            row.update({m: c / args.replicates for m, c in counts.items()})
            rows.append(row)
            print(
                f"  {pool}, {null}: n={n:5d} delta={delta:+.3f}: "
                + "  ".join(f"{m} {row[m]:.3f}" for m in MODES),
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4, help="models per recipe")
    ap.add_argument("--steps", type=int, default=60, help="from-scratch training steps")
    ap.add_argument("--longer", type=int, default=90, help="extra steps of 'trained longer'")
    ap.add_argument("--retrain-steps", type=int, default=30, help="warm-start retrain steps")
    ap.add_argument("--replicates", type=int, default=400, help="synthetic pairs per cell")
    ap.add_argument("--docs", type=int, nargs="+", default=[170, 1000], help="held-out sizes")
    ap.add_argument(
        "--deltas",
        type=float,
        nargs="+",
        default=[0.01, 0.0, -0.005, -0.01, -0.02],
        help="true relative bits-per-byte differences (negative: challenger better)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "gate.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print("part 1: real tiny models")
        real = real_models(args, Path(tmp))
    print("part 2: synthetic pairs from real per-document losses")
    scratch, retrain = real["scratch"], real["retrain"]
    synth = synthetic(args, scratch[0], scratch[1], "scratch seeds", "sign-flip", args.deltas)
    synth += synthetic(args, retrain[0], retrain[1], "retrain seeds", "sign-flip", args.deltas)
    synth += synthetic(args, scratch[0], scratch[1], "scratch seeds", "centred", [0.0])

    head = " ".join(f"{m:>16}" for m in MODES)
    print(f"\nreal tiny models, 170 documents, promotion rate ({args.seeds} seeds)\n")
    print(f"{'case':48} {'should':>7} {'pairs':>5} {'|rel|':>7} {head}")
    for r in real["rows"]:
        print(
            f"{r['case']:48} {r['should']:>7} {r['pairs']:>5} {r['median_abs_rel_diff']:>7.2%} "
            + " ".join(f"{r[m]:>16.2f}" for m in MODES)
        )
    print(f"\nsynthetic pairs, promotion rate ({args.replicates} replicates per row)\n")
    print(f"{'per-document differences of':28} {'null':>9} {'docs':>5} {'true diff':>9} {head}")
    for r in synth:
        print(
            f"{r['pool']:28} {r['null']:>9} {r['docs']:>5} {r['true_rel_diff']:>+9.1%} "
            + " ".join(f"{r[m]:>16.3f}" for m in MODES)
        )
    print(f"\ndecide_promotion (2000 paired resamples, 170 docs): {real['gate_ms']:.1f} ms")
    result = {
        "bench": "gate",
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "real": real["rows"],
        "synthetic": synth,
        "decide_promotion_ms": real["gate_ms"],
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
