"""`flywheel evaluate [MODEL] [--data DIR]`: one model on the held-out split (optionally gated).

Each model is scored by the pipeline's own evaluate step (`flywheel.stages.evaluate`), with
its ledger entry, under a `cli-...` run id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.common import (
    DataOpt,
    OverridesArg,
    ProfileOpt,
    check_input_dir,
    check_output,
    cli_run_id,
    console,
    note,
    note_dataset,
    profile_from,
    styled,
    table,
)

# A dotted override (`eval.max_docs=6`): with MODEL optional, the first override would
# otherwise be taken for the model.
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def evaluate(
    model: Annotated[
        str | None,
        typer.Argument(
            help="a model directory or models:/<name>@<alias> (default: the registry's champion)"
        ),
    ] = None,
    data: DataOpt = None,
    against: Annotated[
        str | None,
        typer.Option("--against", help="also evaluate this model and show the gate's decision"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the report (JSON) here")] = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
) -> None:
    """Bits per byte, perplexity and next-token accuracy (bootstrap intervals) on held-out documents."""
    from flywheel import stages
    from flywheel.defaults import default_dataset, default_model
    from flywheel.errors import RegistryError
    from flywheel.evaluate.core import resolve_model

    if model is not None and _OVERRIDE.match(model) and not Path(model).exists():
        overrides, model = [model, *(overrides or [])], None
    prof = profile_from(profile, overrides)
    check_input_dir(data, "--data")
    check_output(out, "--out", file=True)
    # What the user left out is chosen (and may fail) before any download; it is said on
    # stderr once every check has passed, so a refused command still prints one line.
    dataset = data if data is not None else default_dataset(prof)
    version = None
    if model is None:
        model, version = default_model(prof)
    # Both models are found before either is scored: a typo in --against must not cost
    # the first evaluation (a registry URI is downloaded once and cached).
    for name in (model, against):
        if name is not None:
            resolve_model(prof, name)
    if data is None:
        note_dataset(dataset)
    if version is not None:
        note(f"model: {model} (champion, version {version})")
    run_id = cli_run_id()
    # The champion by role (None), so its entry is the step's "evaluate-champion".
    report = stages.evaluate(prof, None if version else model, dataset, None, run_id)
    if report is None:  # demoted between the look-up and now
        raise RegistryError(f"{prof.registry.model_name} has no champion any more")
    rows: dict[str, object] = dict(report.metrics())
    console.print(table(f"evaluation: {model}", rows))
    for g in report.generation:
        verdict = "ok" if g.passed else "FAILED"
        console.print(styled((g.prompt, "bold"), f" -> {g.output!r} ({verdict})"))
    if out:
        report.save(out)
        console.print(f"report: {out}")
    if against:
        from rich.markdown import Markdown

        from flywheel.gate import decide_promotion

        other = stages.evaluate(prof, against, dataset, None, run_id)
        decision = decide_promotion(report, other, prof.gate)
        console.print(Markdown(decision.to_markdown(report, other)))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
