"""The retraining DAG's wall time per task, and what orchestration costs.

    python scripts/bench/bench_pipeline.py                       # default profile, fresh state dir
    python scripts/bench/bench_pipeline.py --runs 2 tune.enabled=false

For each task: wall time as kfp.local saw it (subprocess start, imports, the stage, outputs)
and the seconds spent inside the stage function (from the run ledger). Orchestration
overhead = task wall - stage seconds, summed; the rest of the pipeline's wall time is
kfp.local's own bookkeeping between tasks. `--runs 2` measures a second, warm-started run
gated against the first one's champion. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flywheel import contracts, ledger
from flywheel.config import load_profile
from flywheel.kfp.local import run_local

# task name (kfp.local) -> ledger stage name, where they differ
STAGE_OF = {contracts.EVALUATE: contracts.EVALUATE_CHALLENGER}


def measure(profile) -> dict:
    run = run_local("retrain", profile, arguments={"trigger_reason": "benchmark"})
    if not run.succeeded:
        raise SystemExit(f"pipeline failed in {run.failed_task}; see {run.log_file}")
    stages = ledger.collect(profile, run.run_id)
    rows = []
    for task, wall in run.task_seconds.items():
        stage = stages.get(STAGE_OF.get(task, task), {})
        inside = stage.get("metrics", {}).get(contracts.STAGE_SECONDS)
        rows.append(
            {
                "task": task,
                "wall_s": round(wall, 2),
                "stage_s": None if inside is None else round(inside, 2),
            }
        )
    tasks_wall = sum(r["wall_s"] for r in rows)
    inside = sum(r["stage_s"] or 0.0 for r in rows)
    return {
        "run_id": run.run_id,
        "wall_s": round(run.wall_s, 2),
        "tasks": rows,
        "tasks_wall_s": round(tasks_wall, 2),
        "stage_s": round(inside, 2),
        "task_overhead_s": round(tasks_wall - inside, 2),
        "between_tasks_s": round(run.wall_s - tasks_wall, 2),
        "overhead_share": round((run.wall_s - inside) / run.wall_s, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("overrides", nargs="*", help="dotted profile overrides")
    ap.add_argument("--profile", default=None)
    ap.add_argument(
        "--runs", type=int, default=1, help="consecutive runs on one state dir (2: warm start)"
    )
    ap.add_argument("--out", default="bench-results/pipeline.json")
    args = ap.parse_args()

    state = tempfile.mkdtemp(prefix="flywheel-bench-")
    profile = load_profile(args.profile, [f"state_dir={state}", *args.overrides])
    results = []
    for i in range(args.runs):
        t0 = time.monotonic()
        results.append(measure(profile) | {"run": i + 1})
        print(f"run {i + 1}: {time.monotonic() - t0:.1f}s", file=sys.stderr)

    console = Console()
    for r in results:
        t = Table(title=f"run {r['run']}: {r['run_id']}  (wall {r['wall_s']}s)")
        for col in ("task", "wall s", "inside stage s", "overhead s"):
            t.add_column(col, justify="left" if col == "task" else "right")
        for row in r["tasks"]:
            over = "" if row["stage_s"] is None else f"{row['wall_s'] - row['stage_s']:.1f}"
            t.add_row(
                row["task"],
                f"{row['wall_s']:.1f}",
                "" if row["stage_s"] is None else f"{row['stage_s']:.1f}",
                over,
            )
        t.add_row(
            "[b]all tasks[/b]",
            f"{r['tasks_wall_s']:.1f}",
            f"{r['stage_s']:.1f}",
            f"{r['task_overhead_s']:.1f}",
        )
        t.add_row(
            "between tasks (kfp.local)",
            f"{r['between_tasks_s']:.1f}",
            "",
            f"{r['between_tasks_s']:.1f}",
        )
        t.add_row(
            "[b]pipeline[/b]",
            f"{r['wall_s']:.1f}",
            f"{r['stage_s']:.1f}",
            f"{r['wall_s'] - r['stage_s']:.1f} ({r['overhead_share']:.0%})",
        )
        console.print(t)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "overrides": args.overrides,
    }
    out.write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
