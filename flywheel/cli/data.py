"""`flywheel data prepare`: the data stage alone, with a progress display and the counts.

It runs the pipeline's own prepare step (`flywheel.stages.prepare`): an s3:// or gs://
source staged in, the champion's tokenizer when a warm-started run will train on it, the
same ledger entry, under a `cli-...` run id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from flywheel.cli.common import (
    OverridesArg,
    ProfileOpt,
    check_output,
    cli_run_id,
    console,
    profile_from,
    styled,
    table,
)
from flywheel.progress import DataStepDone, DataStepStarted, Event

data_app = typer.Typer(
    help="The data stage: sources -> Ray Data steps -> parquet + manifest.", no_args_is_help=True
)

STEP_LABELS = {
    "ray": "start Ray",
    "read": "read, normalize, quality filter",
    "dedup": "exact dedup, MinHash signatures",
    "near_dedup": "near-duplicates (LSH bands, Ray groupby)",
    "split": "split by content hash",
    "tokenizer": "tokenizer",
    "tokenize": "tokenize (and count tokens per key range)",
    "write": "pack sequences, write shards, reports + manifest (in Ray)",
}


def _quiet_ray_data() -> None:
    # Ray Data logs each execution plan at INFO and draws its own tqdm bars; the rich
    # display below replaces both. Its ERROR lines repeat a failed block's traceback: the
    # stage turns that failure into one line naming the block and the row, so they are
    # only shown with --verbose (which lowers the root logger to DEBUG).
    import ray.data

    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("ray.data").setLevel(logging.ERROR if verbose else logging.CRITICAL)
    ray.data.DataContext.get_current().enable_progress_bars = False


@data_app.command("prepare")
def prepare_cmd(
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="output directory (default: <state_dir>/datasets/<content hash>)"
        ),
    ] = None,
) -> None:
    """Prepare a dataset: read, clean, dedup, split, tokenize, pack; print the counts."""
    from flywheel import stages
    from flywheel.data.output import check_dataset_output
    from flywheel.defaults import DATASETS

    prof = profile_from(profile, overrides)  # a bad profile fails here, before any work
    check_output(out, "--out")  # one line naming the flag, before Ray starts
    if out is not None:  # overlap with the source, files the stage did not write (exit 2)
        check_dataset_output(prof.data, out, label="--out")
    _quiet_ray_data()
    # Without --out the dataset lands in the store under its content hash; either way the
    # stage builds it in a working directory beside the target and removes that on failure.
    target = out if out is not None else prof.state_path(DATASETS)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(event: Event) -> None:
            match event:
                case DataStepStarted(step=step):
                    tasks[step] = bar.add_task(STEP_LABELS.get(step, step), total=1)
                case DataStepDone(step=step, counts=counts):
                    label = STEP_LABELS.get(step, step)
                    summary = ", ".join(f"{k}={v}" for k, v in counts.items())
                    bar.update(tasks[step], completed=1, description=f"{label}  {summary}")

        stats = stages.prepare(
            prof, "", target, cli_run_id(), progress=progress, store=out is None, label="--out"
        )
    console.print(table(f"dataset {stats.content_hash[:12]}", stats.rows()))
    console.print(styled("wrote ", (str(stats.out_dir), "bold")))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
