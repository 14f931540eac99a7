"""Benchmark: the monitor's check of one window - how long it takes, and what it decides.

    python scripts/bench/bench_monitor.py                 # defaults below
    python scripts/bench/bench_monitor.py --docs 10000 --steps 200

The champion is a real tiny model (tests/fixtures_models.py: 2-layer GPT-2, byte-level BPE
of 512 tokens trained on 90% of the pydoc paragraphs, `--steps` AdamW steps). Its drift
reference is 400 of its training paragraphs, its held-out sample the other 10%: what
`flywheel.stages.train` logs with a training run.

Part 1, time: `flywheel.monitor`'s steps on a window of `--docs` documents (a JSONL file of
pydoc paragraphs, licence paragraphs and standard-library code, repeated to that count):
reading and sampling the window (`drift.max_rows`, default 2000), Evidently's
distribution drift with the tokenizer's OOV descriptor, and the champion's bits per byte
on `drift.performance_docs` (200) documents of each side. Also with max_rows = --docs
(every document measured) to show what the sample saves.

Part 2, decisions: the windows the tests use (held-out docs of the same distribution, the
longest paragraphs of the same docs - a narrower slice of the same source -, licence texts
from /usr/share/common-licenses, standard-library code), each with its drift score, drifted
features, the champion's bits per byte on it vs on its held-out sample with the bootstrap
interval, and the decision under each `drift.trigger` (no cooldown, nothing in flight).
Writes bench-results/monitor.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

N_WINDOW = 250


def _champion(root: Path, steps: int):
    import pandas as pd
    from drift_corpora import write_reference
    from fixtures_models import fresh_model, save_model, split_paragraphs, train_steps
    from fixtures_models import train_tokenizer as model_tokenizer

    train, test = split_paragraphs()
    tok = model_tokenizer(train)
    model = fresh_model(tok)
    train_steps(model, tok, train, steps)
    model_dir = save_model(model, tok, root / "champion")
    reference = write_reference(train[:400], root / "reference.parquet")
    heldout = root / "test.parquet"
    pd.DataFrame({"text": test}).to_parquet(heldout)
    return model_dir, reference, heldout, test


def _windows(held_out: list[str]) -> dict[str, list[str]]:
    from drift_corpora import license_paragraphs, pydoc_paragraphs, stdlib_code_chunks

    out = {
        "same distribution (held-out docs)": held_out[:N_WINDOW],
        "narrower slice (longest paragraphs, same docs)": sorted(
            pydoc_paragraphs(), key=len, reverse=True
        )[:N_WINDOW],
    }
    licences = license_paragraphs()
    if len(licences) >= 100:
        out["licence texts"] = licences[:N_WINDOW]
    out["stdlib code"] = stdlib_code_chunks(N_WINDOW)
    return out


def _check(profile, window, reference, heldout, model_dir, out: Path) -> dict:
    """monitor.check's steps, without the registry: drift, degradation, decisions."""
    from flywheel import degradation, monitor
    from flywheel.drift import check_drift, load_window

    t0 = time.perf_counter()
    frame = load_window(window, profile.drift)
    t1 = time.perf_counter()
    drift = check_drift(profile, frame, reference, model_dir, out)
    t2 = time.perf_counter()
    ref_texts = monitor.read_texts(heldout)
    perf = degradation.measure(profile, model_dir, frame["text"].tolist(), ref_texts)
    t3 = time.perf_counter()
    decisions = {
        trigger: monitor.decide_retrain(
            trigger=trigger,
            drifted=drift.drifted,
            drift_reason=drift.reason,
            performance=perf,
            min_degradation=profile.drift.min_degradation,
            now=0.0,
            last_event=None,
            cooldown_s=0.0,
            in_flight=[],
        )
        for trigger in ("distribution", "performance", "both")
    }
    return {
        "seconds": {
            "load_window": t1 - t0,
            "distribution": t2 - t1,
            "performance": t3 - t2,
            "total": t3 - t0,
        },
        "rows": len(frame),
        "drift_score": drift.drift_score,
        "drifted": drift.drifted,
        "drifted_features": drift.drifted_features,
        "features": {k: round(f.score, 4) for k, f in drift.features.items()},
        "performance": perf.to_dict(),
        "decisions": {k: {"retrain": d.retrain, "reason": d.reason} for k, d in decisions.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents in the timed window")
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps of the champion")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "monitor.json")
    args = parser.parse_args()

    import torch
    from drift_corpora import license_paragraphs, stdlib_code_chunks, write_window

    from flywheel.config import load_profile

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_dir, reference, heldout, test = _champion(root, args.steps)
        print(f"champion trained in {time.perf_counter() - t0:.1f}s")
        profile = load_profile(None, [f"state_dir={root / '.flywheel'}"])

        mixed = test + license_paragraphs() + stdlib_code_chunks(600)
        big = [mixed[i % len(mixed)] for i in range(args.docs)]
        big_window = write_window(big, root / "big.jsonl")
        timing = {}
        for label, prof in (
            ("max_rows=2000 (default)", profile),
            (
                f"max_rows={args.docs}",
                load_profile(
                    None, [f"state_dir={root / '.flywheel'}", f"drift.max_rows={args.docs}"]
                ),
            ),
        ):
            r = _check(prof, big_window, reference, heldout, model_dir, root / "out")
            timing[label] = {"rows": r["rows"], **{k: round(v, 2) for k, v in r["seconds"].items()}}
            print(f"{args.docs} docs, {label}: {timing[label]}")

        decisions = {}
        for name, texts in _windows(test[len(test) // 2 :]).items():
            window = write_window(texts, root / f"{len(decisions)}.jsonl")
            decisions[name] = _check(profile, window, reference, heldout, model_dir, root / "out")
            d, p = decisions[name], decisions[name]["performance"]
            print(
                f"| {name} | {d['drift_score']:.2f} | {len(d['drifted_features'])}/"
                f"{len(d['features'])} | {p['window_bpb']:.3f} vs {p['reference_bpb']:.3f} | "
                f"{p['rel']:+.1%} ({p['low']:+.1%}..{p['high']:+.1%}) | "
                + " | ".join(
                    "retrain" if d["decisions"][t]["retrain"] else "no"
                    for t in ("distribution", "performance", "both")
                )
                + " |"
            )

    result = {
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version()},
        "docs": args.docs,
        "champion_steps": args.steps,
        "timing": timing,
        "decisions": decisions,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
