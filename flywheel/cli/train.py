"""`flywheel train`: the training stage alone on a prepared dataset, with progress and a table."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from flywheel.cli.common import (
    DataOpt,
    OverridesArg,
    ProfileOpt,
    check_input_dir,
    check_output,
    console,
    dataset_from,
    profile_from,
    table,
)


def train_cmd(
    data: DataOpt = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="a new model directory (default: <state_dir>/models/<run>)"
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option("--init-from", help="warm-start from this save_pretrained model directory"),
    ] = None,
) -> None:
    """Train (or continue training) a causal LM with DeepSpeed on Ray Train; print a summary."""
    from flywheel.train import train

    prof = profile_from(profile, overrides)  # a bad profile fails here, before any work
    check_input_dir(data, "--data")
    check_input_dir(init_from, "--init-from")
    # A directory with files in it is refused: the export would overwrite them.
    check_output(out, "--out", empty=True)
    data = dataset_from(prof, data)
    # Ray Data and Ray Train log each execution at INFO; the bar below replaces them.
    logging.getLogger("ray").setLevel(logging.ERROR)
    # Not created here: training creates it at the end, after the inputs are checked.
    target = out or prof.state_root() / "models" / time.strftime("model-%Y%m%d-%H%M%S")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} steps"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("checking inputs", total=prof.train.max_steps)

        def progress(event: str, info: dict) -> None:
            if event == "plan":
                bar.update(
                    task,
                    completed=info["resume_step"],
                    description=(
                        f"starting Ray + DeepSpeed ({info['workers']} workers, "
                        f"global batch {info['global_batch']}, ZeRO-{info['zero_stage']})"
                    ),
                )
            elif event == "step":
                bar.update(
                    task,
                    completed=info["step"],
                    description=f"loss {info['loss']:.3f}  {info['tokens_per_s']:,.0f} tok/s",
                )
            elif event == "done":
                bar.update(task, description="done")

        result = train(
            prof,
            data,
            target,
            init_from=str(init_from) if init_from else None,
            tags={"trigger_reason": "cli"},
            progress=progress,
        )
    console.print(table("training", result.rows()))


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
