"""`flywheel train`: the training stage alone on a prepared dataset, with progress and a table.

It runs the pipeline's own train step (`flywheel.stages.train`): the same warm start from
the champion, the same MLflow tags and ledger entry, under a `cli-...` run id.
"""

from __future__ import annotations

import logging
import time
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
    count_bar,
    dataset_from,
    profile_from,
    table,
)
from flywheel.progress import Event, StageDone, TrainPlanned, TrainStep


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
        typer.Option(
            "--init-from",
            help="warm-start from this save_pretrained model directory "
            "(default: the champion, when model.warm_start and one exists)",
        ),
    ] = None,
) -> None:
    """Train (or continue training) a causal LM with DeepSpeed on Ray Train; print a summary."""
    from flywheel import stages

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
    run_id = cli_run_id()
    with count_bar("steps") as bar:
        task = bar.add_task("checking inputs", total=prof.train.max_steps)

        def progress(event: Event) -> None:
            match event:
                case TrainPlanned():
                    bar.update(
                        task,
                        completed=event.resume_step,
                        description=(
                            f"starting Ray + DeepSpeed ({event.workers} workers, "
                            f"global batch {event.global_batch}, ZeRO-{event.zero_stage})"
                        ),
                    )
                case TrainStep():
                    bar.update(
                        task,
                        completed=event.step,
                        description=f"loss {event.loss:.3f}  {event.tokens_per_s:,.0f} tok/s",
                    )
                case StageDone():
                    bar.update(task, description="done")

        result = stages.train(
            prof, data, None, target, "cli", run_id, init_from=init_from, progress=progress
        )
    console.print(table("training", result.rows()))


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
