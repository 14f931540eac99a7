"""`flywheel tune`: the tuning stage alone on a prepared dataset, with progress and a table.

It runs the pipeline's own tune step (`flywheel.stages.tune`): one study per dataset, trials
starting where training will (the champion when the profile warm-starts), the same ledger
entry, under a `cli-...` run id.
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
from flywheel.progress import Event, StudyStarted, TrialEnded, TrialReported


def tune_cmd(
    data: DataOpt = None,
    overrides: OverridesArg = None,
    profile: ProfileOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="where best_params.json and tuning.html go (default: <state_dir>/tune/<run>)",
        ),
    ] = None,
) -> None:
    """Run tune.n_trials more trials of the profile's Optuna study; print the best parameters.

    The study is tune.study_name plus the dataset's content hash, as in the pipeline: rerunning
    on the same dataset continues it (its trial numbers go on), new data starts a new one.
    Example: flywheel tune --data .flywheel/datasets/<hash> tune.n_trials=8 tune.pruner=none
    """
    from flywheel import stages

    prof = profile_from(profile, overrides)  # a bad profile fails here, before any work
    check_input_dir(data, "--data")
    check_output(out, "--out")  # best_params.json and tuning.html are replaced, nothing else
    data = dataset_from(prof, data)
    logging.getLogger("ray").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Not created here: tuning creates it when it writes, after the inputs are checked.
    target = out or prof.state_root() / "tune" / time.strftime("tune-%Y%m%d-%H%M%S")
    with count_bar("trials") as bar:
        task = bar.add_task("checking inputs", total=prof.tune.n_trials)
        best: list[float] = []

        def progress(event: Event) -> None:
            match event:
                case StudyStarted():
                    bar.update(
                        task,
                        description=(
                            f"study {event.study} from trial {event.first_trial} "
                            f"({event.parallel} at once, {event.pruner})"
                        ),
                    )
                case TrialReported():
                    best.append(event.val_loss)
                    bar.update(
                        task,
                        description=f"trial {event.trial} step {event.step}: "
                        f"loss {event.val_loss:.3f} (lowest seen {min(best):.3f})",
                    )
                case TrialEnded():
                    bar.advance(task)

        result = stages.tune(prof, data, target, cli_run_id(), progress=progress)
    plots = result.write_html(target / "tuning.html")
    console.print(table("tuning", [*result.rows(), ("plots", str(plots))]))


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
