"""`flywheel drift check`: one drift measurement, window vs reference, no retrain."""

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

drift_app = typer.Typer(
    help="Drift between production text and the champion's training data.", no_args_is_help=True
)

EXIT_NO_DRIFT = 0
EXIT_DRIFT = 3


@drift_app.command("check")
def check(
    window: Annotated[
        Path | None,
        typer.Option(
            "--window",
            help="JSONL/parquet file or directory of production records (default: drift.window)",
        ),
    ] = None,
    reference: Annotated[
        Path,
        typer.Option("--reference", help="reference documents: a Dataset's text/reference.parquet"),
    ] = Path("text/reference.parquet"),
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="the champion's tokenizer dir (enables the out-of-vocabulary descriptor)",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="report directory (default: state dir)")
    ] = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
) -> None:
    """Compare a production window with the reference and write an HTML report.

    Exit codes: 0 no drift, 3 drift, 1 bad input or data (empty window, missing text
    field, too few rows, or rows too few to decide), 2 bad profile, override or flag (a
    missing --tokenizer).
    """
    from flywheel.drift import check_drift
    from flywheel.errors import ConfigError, DataError

    prof = profile_from(profile, overrides)
    source = window if window is not None else prof.drift.window
    if not source:
        raise ConfigError("no window: pass --window PATH or set drift.window in the profile")
    check_input_dir(tokenizer, "--tokenizer")
    check_output(out, "--out")
    result = check_drift(prof, source, reference, tokenizer_dir=tokenizer, out_dir=out)
    if not result.decided:
        raise DataError(f"window {source}: {result.reason} (report {result.report_html})")
    console.print(table("drift", {**result.metrics(), "report": str(result.report_html)}))
    console.print(result.reason, highlight=False)
    raise typer.Exit(EXIT_DRIFT if result.drifted else EXIT_NO_DRIFT)


def register(app: typer.Typer) -> None:
    app.add_typer(drift_app, name="drift")
