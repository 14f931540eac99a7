"""`flywheel evaluate MODEL --data DIR`: one model on the held-out split (optionally gated)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.common import (
    OverridesArg,
    ProfileOpt,
    check_input_dir,
    check_output,
    console,
    profile_from,
    table,
)


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
    """Bits per byte, perplexity and next-token accuracy (bootstrap intervals) on held-out documents."""
    from flywheel.evaluate import evaluate as run
    from flywheel.evaluate.core import resolve_model

    prof = profile_from(profile, overrides)
    check_input_dir(data, "--data")
    check_output(out, "--out", file=True)
    # Both models are found before either is scored: a typo in --against must not cost
    # the first evaluation (a registry URI is downloaded once and cached).
    for name in (model, against):
        if name is not None:
            resolve_model(prof, name)
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
