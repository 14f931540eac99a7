"""Entry point: `flywheel --help` lists every command.

Expected failures (`FlywheelError`) print one readable line and exit non-zero;
`--verbose` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from typing import Any

import typer

from flywheel.cli.common import err_console, quiet_libraries, styled
from flywheel.errors import FlywheelError, one_line

app = typer.Typer(
    name="flywheel",
    help="Pipeline-as-code for the LLM lifecycle: prepare, tune, train, evaluate, gate, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"verbose": False}


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show tracebacks and debug logs"),
) -> None:
    _state["verbose"] = verbose
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True
    )
    quiet_libraries(verbose, handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not at configuration:
    a handler holding an old stream breaks after a redirect (tests, `flywheel run`)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


# Each module registers its commands on `app` (or adds a sub-typer). Listed here, in
# the order `--help` shows them, so one place says what the CLI offers.
COMMAND_MODULES: list[str] = [
    "flywheel.cli.data",
    "flywheel.cli.train",
    "flywheel.cli.tune",
    "flywheel.cli.kfp",
    "flywheel.cli.drift",
    "flywheel.cli.pipeline",
    "flywheel.cli.evaluate",
    "flywheel.cli.models",
    "flywheel.cli.kuberay",
]
for _mod in COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def _error(message: str):
    # One line whatever the message quotes: click's usage errors repeat what was typed.
    return styled(("error:", "red"), " ", one_line(message))


# The root command's own options. click reads a group's options only before the subcommand's
# name, so `flywheel submit retrain --verbose` was "No such option"; they are accepted
# wherever the user puts them and moved to the front before click parses.
ROOT_OPTIONS = ("--verbose", "-v")


def lift_root_options(argv: list[str]) -> list[str]:
    """argv with every root option moved to the front. A token that is the value of a
    subcommand's option (`--reason -v`) stays: the command tree says which options take a
    value. Nothing after `--` moves."""
    import typer.main

    cmd: Any = typer.main.get_command(app)
    lifted: list[str] = []
    rest: list[str] = []
    value_next = False
    for i, token in enumerate(argv):
        if token == "--":
            rest.extend(argv[i:])
            break
        if value_next:
            rest.append(token)
            value_next = False
        elif token in ROOT_OPTIONS:
            lifted.append(token)
        else:
            rest.append(token)
            sub = getattr(cmd, "commands", {}).get(token)
            if sub is not None:
                cmd = sub
            elif token.startswith("-") and "=" not in token:
                value_next = _takes_value(cmd, token)
    return lifted + rest


def _takes_value(cmd: Any, flag: str) -> bool:
    for param in getattr(cmd, "params", []):
        if flag in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())):
            return not (getattr(param, "is_flag", False) or getattr(param, "count", False))
    return False


def main(argv: list[str] | None = None) -> None:
    # Ray and DeepSpeed print a lot at import and init; keep the user's screen for us.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        # With standalone_mode=False click returns a command's exit code instead of exiting.
        args = lift_root_options(sys.argv[1:] if argv is None else list(argv))
        rc = app(args=args, standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except FlywheelError as exc:
        if _state["verbose"]:
            # The traceback, then the same line and exit code as without --verbose: a
            # script's check of the exit code must not change with the detail asked for.
            traceback.print_exc()
        err_console.print(_error(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        # Usage errors from typer's (vendored) click: recognised by shape, not class, because
        # typer ships its own copy of click whose classes are not click's.
        name = type(exc).__name__
        if name == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if name == "Abort":
            sys.exit(1)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            message = exc.format_message()
            # `flywheel` or `flywheel models` alone: click has printed the usage and raises
            # with no message; an empty `error:` line would read as a failure of its own.
            if message.strip():
                err_console.print(_error(message), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if _state["verbose"]:
            raise
        err_console.print(
            _error(f"{name}: {exc} (run with --verbose for the traceback)"),
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
