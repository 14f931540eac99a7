"""What a study returns and shows: `TuneResult`, its metrics, and one HTML page of plots.

The plots are matplotlib figures inlined as SVG (flywheel.charts), like the training loss
curve: Optuna's own plots are plotly figures whose self-contained HTML carries a ~3.5 MB
script bundle per artifact; this page is tens of KB, has no scripts, and renders in the
KFP UI's sandboxed iframe.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from flywheel.charts import BLUE, GREY, RED, integer_x_ticks, svg_chart

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BEST_PARAMS_FILE = "best_params.json"


class TrialRecord(BaseModel):
    number: int
    state: str
    """Optuna's state: COMPLETE, PRUNED, FAIL (RUNNING/WAITING for an interrupted run)."""
    value: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    intermediate: dict[int, float] = Field(default_factory=dict)
    """optimizer step -> training loss reported at that step."""
    steps: int = 0
    """Optimizer steps this trial ran (its last report)."""
    this_run: bool = True


class TuneResult(BaseModel):
    best_params: dict[str, Any]
    """train field -> value, plain JSON types; merged into `train` for the full run."""
    best_value: float
    best_trial: int
    trials_complete: int
    trials_pruned: int
    trials_failed: int
    trial_steps_spent: int
    trial_steps_budget: int
    study_name: str
    storage: str
    """Where the study lives, password removed."""
    study_trials: int
    first_trial: int
    pruner: str
    trial_steps: int
    trials: list[TrialRecord] = Field(default_factory=list)
    importances: dict[str, float] = Field(default_factory=dict)
    errors: dict[int, str] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    best_params_path: str | None = None
    wall_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "best_value": self.best_value,
            "trials_complete": float(self.trials_complete),
            "trials_pruned": float(self.trials_pruned),
            "trials_failed": float(self.trials_failed),
            "trial_steps_spent": float(self.trial_steps_spent),
            "trial_steps_budget": float(self.trial_steps_budget),
            "study_trials": float(self.study_trials),
            "wall_s": self.wall_s,
        }

    def rows(self) -> list[tuple[str, object]]:
        return [
            ("study", f"{self.study_name} ({self.storage})"),
            ("trials (this run)", f"{self.first_trial}..{self.first_trial + self.n_run - 1}"),
            (
                "complete / pruned / failed",
                f"{self.trials_complete} / {self.trials_pruned} / {self.trials_failed}",
            ),
            ("trial steps spent / budget", f"{self.trial_steps_spent} / {self.trial_steps_budget}"),
            ("best loss", f"{self.best_value:.4f} (trial {self.best_trial})"),
            ("best params", ", ".join(f"{k}={_fmt(v)}" for k, v in self.best_params.items())),
            ("wall time (s)", f"{self.wall_s:.1f}"),
            ("best params file", self.best_params_path or "-"),
            ("mlflow run", self.mlflow_run_id or "-"),
        ]

    @property
    def n_run(self) -> int:
        return sum(t.this_run for t in self.trials)

    def write_html(self, path: str | Path) -> Path:
        """One self-contained page: optimization history, per-step losses, importances."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tuning_html(self))
        return path


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------ plots


def _last(rec: TrialRecord) -> float | None:
    if rec.value is not None:
        return rec.value
    if rec.intermediate:
        return rec.intermediate[max(rec.intermediate)]
    return None


def history_svg(result: TuneResult) -> str:
    """Each trial's loss by trial number (pruned: its last reported loss, hollow; failed:
    a red cross on the axis), and the best finished loss so far as a dashed step line."""

    def draw(ax: Axes) -> None:
        def points(state: str) -> tuple[list[int], list[float]]:
            shown = [
                (r.number, v)
                for r in result.trials
                if r.state == state and (v := _last(r)) is not None
            ]
            return [n for n, _ in shown], [v for _, v in shown]

        done, pruned = points("COMPLETE"), points("PRUNED")
        failed = [r.number for r in result.trials if r.state == "FAIL"]
        if done[0]:
            ax.scatter(*done, s=30, color=BLUE, label="finished", zorder=3)
        if pruned[0]:
            ax.scatter(
                *pruned,
                s=30,
                facecolors="none",
                edgecolors=GREY,
                label="pruned (last reported loss)",
                zorder=3,
            )
        if failed:
            # On the x axis, whatever the loss scale: a failed trial has no loss.
            ax.scatter(
                failed,
                [0.04] * len(failed),
                marker="x",
                color=RED,
                transform=ax.get_xaxis_transform(),
                label="failed",
            )
        best, line = math.inf, []
        for r in result.trials:
            if r.state == "COMPLETE" and r.value is not None:
                best = min(best, r.value)
            if math.isfinite(best):
                line.append((r.number, best))
        if line:
            ax.step(
                *zip(*line, strict=True),
                where="post",
                color=RED,
                linestyle=(0, (5, 3)),
                linewidth=1.5,
                label="best so far",
            )
        integer_x_ticks(ax)
        ax.set_xlabel("trial")
        ax.set_ylabel("training loss at the trial's last step")
        ax.legend(loc="best")

    return svg_chart(draw)


def curves_svg(result: TuneResult) -> str:
    """Loss at each reported step of every trial of this run: where ASHA stopped which."""

    def draw(ax: Axes) -> None:
        recs = [r for r in result.trials if r.this_run and r.intermediate]
        for rec in recs:
            steps, losses = zip(*sorted(rec.intermediate.items()), strict=True)
            (line,) = ax.plot(
                steps,
                losses,
                linewidth=2,
                marker="o",  # a trial pruned at its first report is a single point
                markersize=3,
                linestyle=(0, (4, 3)) if rec.state == "PRUNED" else "-",
            )
            ax.annotate(
                f"#{rec.number}",
                (steps[-1], losses[-1]),
                xytext=(4, 0),
                textcoords="offset points",
                color=line.get_color(),
                va="center",
            )
        ax.set_xlim(left=0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")

    return svg_chart(draw)


def importances_svg(importances: dict[str, float]) -> str:
    items = sorted(importances.items(), key=lambda kv: kv[1])  # barh draws bottom-up

    def draw(ax: Axes) -> None:
        bars = ax.barh([name for name, _ in items], [v for _, v in items], color=BLUE)
        ax.bar_label(bars, fmt="%.3f", padding=3)
        ax.set_xlim(0, max(1.0, *(v for _, v in items)) * 1.1)
        ax.grid(axis="y", visible=False)
        ax.set_axisbelow(True)

    return svg_chart(draw, height=0.6 + 0.3 * len(items))


def tuning_html(result: TuneResult) -> str:
    title = f"tuning — study {result.study_name}"
    best = ", ".join(f"{k} = {_fmt(v)}" for k, v in result.best_params.items())
    summary = (
        f"Best loss {result.best_value:.4f} (trial {result.best_trial}): {best}. "
        f"This run: trials {result.first_trial}..{result.first_trial + result.n_run - 1}, "
        f"{result.trials_complete} complete, {result.trials_pruned} pruned "
        f"({result.pruner}), {result.trials_failed} failed; "
        f"{result.trial_steps_spent} of {result.trial_steps_budget} trial steps spent "
        f"({result.trial_steps} per trial). Study total: {result.study_trials} trials."
    )
    if result.importances:
        imp = importances_svg(result.importances)
    else:
        n = sum(t.state == "COMPLETE" for t in result.trials)
        why = (
            "one parameter is tuned, so it has all the importance"
            if len(result.best_params) < 2
            else f"needs at least 2 finished trials with distinct values (have {n})"
        )
        imp = f"<p><i>Not estimated: {html.escape(why)}.</i></p>"
    errors = "".join(
        f"<li>trial {n}: {html.escape(e)}</li>" for n, e in sorted(result.errors.items())
    )
    rows = "".join(
        f"<tr><td>{r.number}</td><td>{r.state}</td>"
        f"<td>{'' if r.value is None else f'{r.value:.4f}'}</td><td>{r.steps}</td>"
        f"<td>{html.escape(', '.join(f'{k}={_fmt(v)}' for k, v in r.params.items()))}</td></tr>"
        for r in result.trials
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:left}</style>"
        f"</head><body><h3>{html.escape(title)}</h3><p>{html.escape(summary)}</p>"
        "<h4>Optimization history</h4>"
        "<p>Filled: finished; hollow: pruned (last reported loss); red &#215;: failed; "
        "dashed line: best so far.</p>"
        f"{history_svg(result)}"
        "<h4>Loss per step, this run</h4><p>Dashed: stopped early.</p>"
        f"{curves_svg(result)}"
        f"<h4>Parameter importances</h4>{imp}"
        + (f"<h4>Failed trials</h4><ul>{errors}</ul>" if errors else "")
        + "<h4>Trials</h4><table><tr><th>#</th><th>state</th><th>loss</th><th>steps</th>"
        f"<th>params</th></tr>{rows}</table></body></html>"
    )
