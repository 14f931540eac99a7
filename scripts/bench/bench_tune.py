"""Benchmark: tuning with early stopping (ASHA) vs without, on one space and one budget.

    python scripts/bench/bench_tune.py                      # 8 trials x 16 steps, 2 at once
    python scripts/bench/bench_tune.py --trials 12 --steps 24 --seeds 0 1
    python scripts/bench/bench_tune.py --default-only       # just the default profile's study

In one run, for each seed, two fresh studies with the same search space (the default
profile's: lr log-uniform 1e-4..1e-2, warmup 0..5), the same sampler seed and the same
budget of trials x steps:

  * baseline   tune.pruner=none: every trial trains its whole step budget;
  * asha       tune.pruner=asha: Optuna's successive halving (grace = 1/4 of the budget,
               reduction factor 2) stops trials whose validation loss is in the worse
               half at a rung.

Reported: the best validation loss reached (a finished trial's loss on the fixed validation
slice at its last step, nats per token), the
trial-steps spent, wall time, and asha/baseline ratios. Then the default profile's own study
(4 trials x 8 steps, 2 at once), timed end to end as the `tune` stage runs in `flywheel run`
(starting and stopping its own Ray).

Data: `--data DIR` (a prepared dataset) or, by default, a dataset built on the fly from the
pydoc topics (tests/fixtures_data.py) with the profile's block size and vocabulary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine, write_result  # noqa: E402

from flywheel.config import load_profile  # noqa: E402
from flywheel.tune import TuneResult, tune  # noqa: E402


def _row(name: str, r: TuneResult) -> dict:
    return {
        "arm": name,
        "best_loss": r.best_value,
        "trial_steps_spent": r.trial_steps_spent,
        "trial_steps_budget": r.trial_steps_budget,
        "complete": r.trials_complete,
        "pruned": r.trials_pruned,
        "failed": r.trials_failed,
        "wall_s": r.wall_s,
        "best_params": r.best_params,
    }


def _study(overrides: list[str], data: Path, out: Path) -> TuneResult:
    import logging

    logging.getLogger("ray").setLevel(logging.ERROR)
    return tune(load_profile(None, overrides), data, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a prepared dataset (default: built from pydoc)")
    ap.add_argument("--trials", type=int, default=8, help="trials per study")
    ap.add_argument("--steps", type=int, default=16, help="steps per trial (the budget unit)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--default-only", action="store_true", help="only time the default study")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench_tune.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    os.chdir(work)  # the state dir (.flywheel: Optuna, MLflow, Ray) lands here
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    base = load_profile(None, [])
    data = args.data
    if data is None:
        from fixtures_data import build_dataset

        data = build_dataset(
            work / "ds", block_size=base.data.block_size, vocab_size=base.data.tokenizer.vocab_size
        )
    print(f"data: {data}\nstate: {work / '.flywheel'}")

    rows: list[dict] = []
    if not args.default_only:
        budget = [
            f"tune.n_trials={args.trials}",
            f"tune.trial_steps={args.steps}",
            f"tune.parallel={args.parallel}",
        ]
        for seed in args.seeds:
            for arm, pruner in (("baseline (no stopping)", "none"), ("asha", "asha")):
                study = f"bench-{pruner}-{seed}"
                r = _study(
                    [
                        *budget,
                        f"tune.seed={seed}",
                        f"tune.pruner={pruner}",
                        f"tune.study_name={study}",
                    ],
                    data,
                    work / study,
                )
                rows.append({**_row(arm, r), "seed": seed})
                print(
                    f"  seed {seed} {arm}: best {r.best_value:.4f}, "
                    f"{r.trial_steps_spent}/{r.trial_steps_budget} steps, {r.wall_s:.0f} s"
                )
    default = _study(["tune.study_name=bench-default"], data, work / "default")
    rows.append({**_row("default profile study", default), "seed": base.tune.seed})

    ratios: dict[str, float] = {}
    if not args.default_only:

        def med(arm: str, key: str) -> float:
            return statistics.median(r[key] for r in rows if r["arm"].startswith(arm))

        for key in ("best_loss", "trial_steps_spent", "wall_s"):
            ratios[f"{key}_asha_over_baseline"] = med("asha", key) / med("baseline", key)

    print()
    print(
        f"{'arm':<24}{'seed':>5}{'best loss':>11}{'steps spent':>13}{'budget':>8}"
        f"{'done/pruned/failed':>20}{'wall s':>8}"
    )
    for r in rows:
        print(
            f"{r['arm']:<24}{r['seed']:>5}{r['best_loss']:>11.4f}{r['trial_steps_spent']:>13}"
            f"{r['trial_steps_budget']:>8}{r['complete']:>10}/{r['pruned']}/{r['failed']:<7}"
            f"{r['wall_s']:>8.1f}"
        )
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")

    report = {
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "space": base.tune.search_space,
        "rows": rows,
        "ratios": ratios,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print()
    write_result(args.out, report)


if __name__ == "__main__":
    main()
