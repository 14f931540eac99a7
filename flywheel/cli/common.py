"""What every command shares: profile options, the console, error handling."""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from flywheel.config import Profile, load_profile
from flywheel.errors import FlywheelError


def make_console(**kwargs) -> Console:
    """A console that never reads rich markup. What Flywheel prints is full of text it did
    not write (reasons, model and run names, paths, error messages quoting input), and rich
    reads `[...]` in a string as markup: `--reason '[/]'` broke `models history` for good, and
    `[link=...]` in a reason rendered as a link. So no string is ever markup; a style is given
    beside the text (`styled`, `style=`), never inside it."""
    return Console(markup=False, **kwargs)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line of literal pieces, some with a style: styled(("error:", "red"), " ", msg)."""
    return Text.assemble(*parts)


console = make_console()
err_console = make_console(stderr=True)

ProfileOpt = Annotated[
    Path | None,
    typer.Option("--profile", "-p", help="profile YAML (default: configs/local.yaml)"),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="dotted key=value overrides (README: Overrides), e.g. train.max_steps=500 "
        "data.source.kind=files"
    ),
]


# Libraries that talk on the terminal by themselves. MLflow and Ray attach their own stderr
# handlers at INFO when imported (so a level set on their loggers before the import is
# reset): MLflow reads MLFLOW_LOGGING_LEVEL at import, and Ray's level is given to ray.init
# (flywheel.runtime.ray_logging_level follows the root level set here). The others
# propagate to our handler: urllib3 warns about each retry before the error we report,
# alembic logs MLflow's schema migrations on first use.
NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "ray", "filelock", "git", "kfp_server_api")


class LibraryNoise(logging.Filter):
    """Drops records below ERROR from NOISY_LOGGERS. A filter on our handler, not only a
    logger level: some clients set their loggers' levels when they start (kfp_server_api
    sets urllib3's to WARNING), undoing ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".", 1)[0] not in NOISY_LOGGERS


def quiet_libraries(verbose: bool, handler: logging.Handler) -> None:
    """Only Flywheel's own lines on the terminal unless --verbose."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    # MLflow draws a tqdm bar on stderr for every artifact up- and download (a registry
    # model is ~15 files); read when the transfer starts, so setting it here is in time.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Hugging Face's bars ("Loading weights"), read when transformers is first imported:
    # in time for the commands, which import it lazily.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    handler.addFilter(LibraryNoise())


def number_range(
    low: float, high: float | None = None, *, above: bool = False
) -> Callable[[float | None], float | None]:
    """The check every numeric option gets at parse time (a typer callback): finite, at least
    `low` (above it with `above`), at most `high`. A usage error (exit 2) naming the flag,
    before the profile is read or anything is sent: `submit --wait --timeout -5` used to
    upload and start a run, then fail; with --dry-run it passed. click's own ranges accept
    `nan` and `inf`."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        bound = f"above {low:g}" if above else f"at least {low:g}"
        if high is not None:
            bound += f" and at most {high:g}"
        ok = math.isfinite(value) and (value > low if above else value >= low)
        if not ok or (high is not None and value > high):
            raise typer.BadParameter(f"{value:g}: must be a number {bound}")
        return value

    return check


def profile_from(profile: Path | None, overrides: list[str] | None) -> Profile:
    return load_profile(profile, overrides or [])


def cli_run_id() -> str:
    """The run id a stage command records under, as a pipeline step records under its
    pipeline run's: the ledger entries and the Ray run are named by it. `cli-` tells them
    from a pipeline's in MLflow; the random tail keeps two commands started in the same
    second apart (a shared id would resume the other's training checkpoints)."""
    return f"cli-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def count_bar(unit: str) -> Progress:
    """The progress bar of a stage that counts `unit`s towards a total (train: steps, tune:
    trials): description, bar, done/total, elapsed time."""
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit, markup=False),
        TimeElapsedColumn(),
        console=console,
    )


def table(title: str, rows: list[tuple[str, object]] | dict[str, object]) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    items = rows.items() if isinstance(rows, dict) else rows
    for key, value in items:
        t.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    return t


def check_output(path: Path | None, flag: str, *, file: bool = False, empty: bool = False) -> None:
    """Refuse, before any work, an output path the command could not write or would clobber.

    Nothing is created here: a command that fails later leaves no empty folder behind.
    `file`: the output is a file (an existing directory there is an error); else a directory.
    `empty`: an existing directory must be empty (a command never overwrites what it did not
    write). The error names the flag and the path: `--out x/y: ...`.
    """
    if path is None:
        return
    if path.exists():
        if file and path.is_dir():
            raise FlywheelError(f"{flag} {path}: is a directory; name a file")
        if not file and not path.is_dir():
            raise FlywheelError(f"{flag} {path}: exists and is not a directory")
        if empty and any(path.iterdir()):
            raise FlywheelError(f"{flag} {path}: not empty; name a new directory")
        target = path if path.is_dir() else path.parent
    else:
        target = path.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise FlywheelError(f"{flag} {path}: cannot create it ({target} is not a directory)")
    if not os.access(target, os.W_OK | os.X_OK):
        raise FlywheelError(f"{flag} {path}: cannot write in {target} (permission denied)")


def check_input_dir(path: Path | None, flag: str) -> None:
    """A directory the command reads must exist: a usage error (exit 2) naming the flag.
    Checked after the profile, so a bad profile is reported first, and before any store is
    created, so a typo leaves nothing behind."""
    if path is None or path.is_dir():
        return
    what = "is not a directory" if path.exists() else "does not exist"
    raise typer.BadParameter(f"'{path}' {what}", param_hint=flag)


DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        help="a prepared dataset directory (default: the newest in <state_dir>/datasets)",
    ),
]


def dataset_from(profile: Profile, data: Path | None) -> Path:
    """The dataset a stage command reads: --data as given (check it with `check_input_dir`
    first), else the newest one `flywheel data prepare` made, named on stderr so the user
    knows which it took. Called after every other check: a refused command prints one line."""
    if data is not None:
        return data
    from flywheel.defaults import default_dataset

    found = default_dataset(profile)
    note_dataset(found)
    return found


def note_dataset(path: Path) -> None:
    note(f"data: {path} (newest prepared dataset)")


def note(line: str) -> None:
    """One line on stderr about a choice the command made for the user (stdout stays the
    command's result)."""
    err_console.print(line, highlight=False, soft_wrap=True)
