"""`flywheel data prepare`: the data stage alone, with a progress display and the counts."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from flywheel.cli.common import (
    OverridesArg,
    ProfileOpt,
    check_output,
    console,
    profile_from,
    table,
)

data_app = typer.Typer(
    help="The data stage: sources -> Ray Data blocks -> parquet + manifest.", no_args_is_help=True
)

STEP_LABELS = {
    "ray": "start Ray",
    "read": "read, normalize, quality filter",
    "dedup": "exact dedup, MinHash signatures",
    "near_dedup": "near-duplicates (LSH bands, Ray groupby)",
    "split": "split by content hash",
    "tokenizer": "tokenizer",
    "tokenize": "tokenize",
    "write": "pack blocks, write shards + manifest",
}


def _summary(info: dict) -> str:
    shown = {k: v for k, v in info.items() if k not in ("status", "seconds")}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _quiet_ray_data() -> None:
    # Ray Data logs each execution plan at INFO and draws its own tqdm bars; the rich
    # display below replaces both. Errors still surface.
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
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
    from flywheel.data import prepare

    prof = profile_from(profile, overrides)  # a bad profile fails here, before any work
    check_output(out, "--out")  # one line naming the flag, before Ray starts
    _quiet_ray_data()
    target = out or prof.state_path("datasets") / f".incoming-{os.getpid()}"
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(step: str, info: dict) -> None:
            label = STEP_LABELS.get(step, step)
            if info.get("status") == "start":
                tasks[step] = bar.add_task(label, total=1)
            else:
                summary = _summary(info)
                bar.update(tasks[step], completed=1, description=f"{label} [dim]{summary}[/dim]")

        stats = prepare(prof, target, progress=progress)
    if out is None:
        final = target.parent / stats.content_hash[:12]
        # The same hash means the same inputs and config: the old copy is replaced by an
        # identical one, which keeps the directory name a promise about its content.
        shutil.rmtree(final, ignore_errors=True)
        target.rename(final)
        stats.out_dir = str(final)
    console.print(table(f"dataset {stats.content_hash[:12]}", stats.rows()))
    console.print(f"wrote [bold]{stats.out_dir}[/bold]")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
