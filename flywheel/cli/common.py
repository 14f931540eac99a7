"""What every command shares: profile options, the console, error handling."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.config import Profile, load_profile

console = Console()
err_console = Console(stderr=True)

ProfileOpt = Annotated[
    Path | None,
    typer.Option("--profile", "-p", help="profile YAML (default: configs/local.yaml)"),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="dotted overrides, e.g. train.max_steps=500 data.source.kind=files"),
]


def profile_from(profile: Path | None, overrides: list[str] | None) -> Profile:
    return load_profile(profile, overrides or [])


def table(title: str, rows: list[tuple[str, object]] | dict[str, object]) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    items = rows.items() if isinstance(rows, dict) else rows
    for key, value in items:
        t.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    return t
