"""What a run returns and shows: `TrainResult`, the summary numbers, the HTML loss curve."""

from __future__ import annotations

import html
import math
from typing import Any

from pydantic import BaseModel


class TrainResult(BaseModel):
    model_dir: str
    loss_curve_html: str
    final_loss: float
    first_loss: float
    steps: int
    tokens: int
    wall_s: float = 0.0
    """End to end, as the caller waits: checks, Ray and DeepSpeed start-up, training, export."""
    tokens_per_s: float = 0.0
    """Training-loop throughput (global tokens per second of step time, first step excluded)."""
    loop_s: float = 0.0
    restarts: int = 0
    """Worker-group restarts survived (a dead worker resumes from the last checkpoint)."""
    resumed_from_step: int = 0
    checkpoint: str | None = None
    """The run's last checkpoint (pass it as train.resume_from to continue)."""
    mlflow_run_id: str | None = None

    def metrics(self) -> dict[str, float]:
        return {
            "final_loss": self.final_loss,
            "first_loss": self.first_loss,
            "steps": float(self.steps),
            "tokens": float(self.tokens),
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "restarts": float(self.restarts),
        }

    def rows(self) -> list[tuple[str, object]]:
        return [
            ("model", self.model_dir),
            ("loss (first -> final)", f"{self.first_loss:.3f} -> {self.final_loss:.3f}"),
            ("steps", self.steps),
            ("tokens", self.tokens),
            ("tokens/s (training loop)", f"{self.tokens_per_s:,.0f}"),
            ("wall time (s)", f"{self.wall_s:.1f}"),
            ("restarts", self.restarts),
            ("loss curve", self.loss_curve_html),
            ("checkpoint", self.checkpoint or "-"),
            ("mlflow run", self.mlflow_run_id or "-"),
        ]


def loop_throughput(history: list[dict[str, Any]], tokens_per_step: int) -> tuple[float, float]:
    """(tokens/s, loop seconds). The first step of each attempt is left out: it pays for
    lazy initialisation (allocator, gloo buffers), not for training."""
    steady = [
        r for i, r in enumerate(history) if i and r.get("attempt") == history[i - 1].get("attempt")
    ]
    loop_s = sum(r["step_s"] for r in history)
    rows = steady or history
    secs = sum(r["step_s"] for r in rows)
    return (len(rows) * tokens_per_step / secs if secs > 0 else 0.0), loop_s


def loss_curve_html(history: list[dict[str, Any]], title: str, subtitle: str = "") -> str:
    """A self-contained page with an inline SVG of loss per step (no scripts, no CDN).

    Hand-drawn SVG rather than plotly: plotly's inline bundle is ~3.5 MB per artifact, this
    is a few KB and renders in the KFP UI's sandboxed iframe.
    """
    w, h, pad_l, pad_r, pad_t, pad_b = 720, 360, 60, 20, 20, 40
    pts = [(r["step"], r["loss"]) for r in history if math.isfinite(r.get("loss", math.nan))]
    body = ""
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        x1 = x1 if x1 > x0 else x0 + 1
        y0, y1 = (y0, y1) if y1 > y0 else (y0 - 0.5, y1 + 0.5)

        def sx(v: float) -> float:
            return pad_l + (v - x0) / (x1 - x0) * (w - pad_l - pad_r)

        def sy(v: float) -> float:
            return pad_t + (y1 - v) / (y1 - y0) * (h - pad_t - pad_b)

        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        ticks = []
        for i in range(5):
            yv = y0 + (y1 - y0) * i / 4
            xv = x0 + (x1 - x0) * i / 4
            ticks.append(
                f'<line x1="{pad_l}" x2="{w - pad_r}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                f'<text x="{pad_l - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>'
                f'<text x="{sx(xv):.1f}" y="{h - pad_b + 16}" text-anchor="middle">{xv:.0f}</text>'
            )
        restarts = [
            f'<line x1="{sx(r["step"]):.1f}" x2="{sx(r["step"]):.1f}" y1="{pad_t}" y2="{h - pad_b}" '
            f'stroke="#d62728" stroke-dasharray="4 3"><title>restart (attempt {r["attempt"]})</title></line>'
            for i, r in enumerate(history)
            if i and r.get("attempt") != history[i - 1].get("attempt")
        ]
        body = (
            "".join(ticks)
            + "".join(restarts)
            + f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>'
            + f'<text x="{(w + pad_l) / 2}" y="{h - 6}" text-anchor="middle">step</text>'
            + f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">loss</text>'
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="11">{body}</svg>'
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body style='font-family:sans-serif'>"
        f"<h3>{html.escape(title)}</h3><p>{html.escape(subtitle)}</p>{svg}</body></html>"
    )
