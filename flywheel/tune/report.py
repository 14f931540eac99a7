"""What a study returns and shows: `TuneResult`, its metrics, and one HTML page of plots.

The page is hand-drawn inline SVG, like the training loss curve: Optuna's own plots are
plotly figures whose self-contained HTML carries a ~3.5 MB script bundle per artifact; this
page is a few KB, has no scripts, and renders in the KFP UI's sandboxed iframe.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

BEST_PARAMS_FILE = "best_params.json"
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


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


class _Frame:
    """Axes mapping data to pixels for one SVG panel."""

    def __init__(self, xs: list[float], ys: list[float], w: int = 720, h: int = 300) -> None:
        self.w, self.h, self.l, self.r, self.t, self.b = w, h, 64, 16, 16, 40
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        self.y0, self.y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if self.x1 <= self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5
        if self.y1 <= self.y0:
            self.y0, self.y1 = self.y0 - 0.5, self.y1 + 0.5
        pad = (self.y1 - self.y0) * 0.05
        self.y0, self.y1 = self.y0 - pad, self.y1 + pad

    def sx(self, v: float) -> float:
        return self.l + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.l - self.r)

    def sy(self, v: float) -> float:
        return self.t + (self.y1 - v) / (self.y1 - self.y0) * (self.h - self.t - self.b)

    def axes(self, xlabel: str, ylabel: str) -> str:
        out = []
        for i in range(5):
            yv = self.y0 + (self.y1 - self.y0) * i / 4
            xv = self.x0 + (self.x1 - self.x0) * i / 4
            out.append(
                f'<line x1="{self.l}" x2="{self.w - self.r}" y1="{self.sy(yv):.1f}" '
                f'y2="{self.sy(yv):.1f}" stroke="#eee"/>'
                f'<text x="{self.l - 6}" y="{self.sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>'
                f'<text x="{self.sx(xv):.1f}" y="{self.h - self.b + 16}" text-anchor="middle">'
                f"{xv:.0f}</text>"
            )
        out.append(
            f'<text x="{(self.w + self.l) / 2}" y="{self.h - 6}" text-anchor="middle">{xlabel}</text>'
            f'<text x="14" y="{self.h / 2}" transform="rotate(-90 14 {self.h / 2})" '
            f'text-anchor="middle">{ylabel}</text>'
        )
        return "".join(out)

    def svg(self, body: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
            f'font-family="sans-serif" font-size="11">{body}</svg>'
        )


def _tip(rec: TrialRecord) -> str:
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in rec.params.items())
    value = f"{rec.value:.4f}" if rec.value is not None else "-"
    return html.escape(
        f"trial {rec.number} {rec.state}: loss {value} after {rec.steps} steps; {params}"
    )


def history_svg(result: TuneResult) -> str:
    """Each trial's loss by trial number (pruned: its last reported loss, hollow; failed:
    a red cross on the axis), and the best finished loss so far as a step line."""
    recs = result.trials
    shown = [(r, _last(r)) for r in recs]
    ys = [v for _, v in shown if v is not None]
    f = _Frame([float(r.number) for r in recs], ys)
    body = [f.axes("trial", "training loss at the trial's last step")]
    best, line = math.inf, []
    for rec, v in shown:
        x = f.sx(rec.number)
        if rec.state == "COMPLETE" and v is not None:
            body.append(
                f'<circle cx="{x:.1f}" cy="{f.sy(v):.1f}" r="4.5" fill="#1f77b4">'
                f"<title>{_tip(rec)}</title></circle>"
            )
            best = min(best, v)
        elif rec.state == "PRUNED" and v is not None:
            body.append(
                f'<circle cx="{x:.1f}" cy="{f.sy(v):.1f}" r="4.5" fill="none" stroke="#999" '
                f'stroke-width="1.5"><title>{_tip(rec)}</title></circle>'
            )
        elif rec.state == "FAIL":
            y = f.h - f.b - 6
            body.append(
                f'<text x="{x:.1f}" y="{y:.1f}" fill="#d62728" text-anchor="middle" '
                f'font-size="14">&#215;<title>{_tip(rec)}</title></text>'
            )
        if math.isfinite(best):
            line.append(f"{x:.1f},{f.sy(best):.1f}")
    if line:
        body.append(
            f'<polyline fill="none" stroke="#d62728" stroke-width="1.5" '
            f'stroke-dasharray="5 3" points="{" ".join(line)}"><title>best so far</title></polyline>'
        )
    return f.svg("".join(body))


def _last(rec: TrialRecord) -> float | None:
    if rec.value is not None:
        return rec.value
    if rec.intermediate:
        return rec.intermediate[max(rec.intermediate)]
    return None


def curves_svg(result: TuneResult) -> str:
    """Loss at each reported step of every trial of this run: where ASHA stopped which."""
    recs = [r for r in result.trials if r.this_run and r.intermediate]
    xs = [float(s) for r in recs for s in r.intermediate]
    ys = [v for r in recs for v in r.intermediate.values()]
    f = _Frame([0.0, *xs], ys)
    body = [f.axes("optimizer step", "training loss")]
    for i, rec in enumerate(recs):
        color = _COLORS[i % len(_COLORS)]
        pts = " ".join(f"{f.sx(s):.1f},{f.sy(v):.1f}" for s, v in sorted(rec.intermediate.items()))
        dash = ' stroke-dasharray="4 3"' if rec.state == "PRUNED" else ""
        body.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{pts}">'
            f"<title>{_tip(rec)}</title></polyline>"
        )
        s, v = max(rec.intermediate.items())
        body.append(
            f'<text x="{f.sx(s) + 4:.1f}" y="{f.sy(v) + 4:.1f}" fill="{color}">#{rec.number}</text>'
        )
    return f.svg("".join(body))


def importances_svg(importances: dict[str, float]) -> str:
    items = sorted(importances.items(), key=lambda kv: -kv[1])
    w, row, left = 720, 26, 160
    h = 20 + row * len(items)
    body = []
    for i, (name, v) in enumerate(items):
        y = 10 + i * row
        bw = max(1.0, v * (w - left - 80))
        body.append(
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{html.escape(name)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row - 8}" fill="#1f77b4"/>'
            f'<text x="{left + bw + 6:.1f}" y="{y + 15}">{v:.3f}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="12">{"".join(body)}</svg>'
    )


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
