"""What a run returns and shows: `TrainResult`, the summary numbers, the HTML loss curve."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from flywheel.charts import BLUE, RED, integer_x_ticks, svg_chart

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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
    lazy initialisation (allocator, gloo buffers), not for training. A step's own `tokens`
    (the loop's count of real, unpadded tokens) wins over `tokens_per_step`."""
    steady = [
        r for i, r in enumerate(history) if i and r.get("attempt") == history[i - 1].get("attempt")
    ]
    loop_s = sum(r["step_s"] for r in history)
    rows = steady or history
    secs = sum(r["step_s"] for r in rows)
    tokens = sum(r.get("tokens", tokens_per_step) for r in rows)
    return (tokens / secs if secs > 0 else 0.0), loop_s


def loss_curve_html(history: list[dict[str, Any]], title: str, subtitle: str = "") -> str:
    """A self-contained page with the loss per step as inline SVG (no scripts, no CDN);
    a dashed red line marks each worker-group restart."""
    points = [(r["step"], r["loss"]) for r in history if math.isfinite(r.get("loss", math.nan))]
    restarts = [
        r for i, r in enumerate(history) if i and r.get("attempt") != history[i - 1].get("attempt")
    ]

    def draw(ax: Axes) -> None:
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, color=BLUE, linewidth=2, gid="loss")
        for r in restarts:
            ax.axvline(
                r["step"],
                color=RED,
                linestyle=(0, (4, 3)),
                linewidth=1,
                label=f"restart (attempt {r['attempt']})",
            )
        if restarts:
            ax.legend(loc="upper right")
        integer_x_ticks(ax)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")

    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body style='font-family:sans-serif'>"
        f"<h3>{html.escape(title)}</h3><p>{html.escape(subtitle)}</p>"
        f"{svg_chart(draw, height=3.6)}</body></html>"
    )
