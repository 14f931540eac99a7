"""`flywheel evaluate MODEL --data DIR`: one model on the held-out split (optionally gated)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.common import OverridesArg, ProfileOpt, console, profile_from, table


def evaluate(
    model: Annotated[str, typer.Argument(help="a model directory or models:/<name>@<alias>")],
    data: Annotated[Path, typer.Option("--data", help="a prepared Dataset directory")],
    against: Annotated[
        str | None,
        typer.Option("--against", help="also evaluate this model and show the gate's decision"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the report (JSON) here")] = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
) -> None:
    """Perplexity and next-token accuracy (with bootstrap intervals) on held-out documents."""
    from flywheel.evaluate import evaluate as run

    prof = profile_from(profile, overrides)
    report = run(prof, model, data)
    rows: dict[str, object] = dict(report.metrics())
    console.print(table(f"evaluation: {model}", rows))
    for g in report.generation:
        console.print(f"[bold]{g.prompt}[/] -> {g.output!r} ({'ok' if g.passed else 'FAILED'})")
    if out:
        report.save(out)
        console.print(f"report: {out}")
    if against:
        from rich.markdown import Markdown

        from flywheel.gate import decide_promotion

        other = run(prof, against, data)
        decision = decide_promotion(report, other, prof.gate)
        console.print(Markdown(decision.to_markdown(report, other)))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
