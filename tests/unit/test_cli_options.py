"""Issue 24, rule 7: CLI options in any position, numeric options checked at parse time.

`--verbose` is the root command's option; click reads a group's options only before the
subcommand, so `flywheel submit retrain --verbose` was "No such option". `lift_root_options`
moves it to the front unless it is another option's value. Every numeric option is checked
by `number_range` when the command line is parsed (finite, within range, exit 2 naming the
flag), so `submit --wait --timeout -5` fails before the profile is read or anything is
sent, with or without --dry-run.
"""

from __future__ import annotations

import socket
import threading

import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.cli.main import lift_root_options, main


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["submit", "retrain", "--verbose"], ["--verbose", "submit", "retrain"]),
        (["models", "history", "-v", "x=1"], ["-v", "models", "history", "x=1"]),
        (["--verbose", "run"], ["--verbose", "run"]),
        # the value of a subcommand's option stays where it is
        (
            ["models", "promote", "1", "--reason", "-v"],
            ["models", "promote", "1", "--reason", "-v"],
        ),
        (["submit", "retrain", "--host", "-v"], ["submit", "retrain", "--host", "-v"]),
        # a flag takes no value: what follows it is free to move
        (["submit", "retrain", "--wait", "-v"], ["-v", "submit", "retrain", "--wait"]),
        (["run", "--", "-v"], ["run", "--", "-v"]),
        (
            ["models", "promote", "1", "--reason=-v", "-v"],
            ["-v", "models", "promote", "1", "--reason=-v"],
        ),
    ],
)
def test_root_options_are_lifted_from_any_position(argv, want):
    assert lift_root_options(argv) == want


def test_verbose_after_the_subcommand_takes_effect(tmp_path):
    out = flywheel(tmp_path, "submit", "retrain", "train..lr=1", "--verbose")
    assert out.returncode == 2, out.stderr
    assert "Traceback" in out.stderr and "No such option" not in out.stderr
    assert nonblank(out.stderr)[-1].startswith("error: override 'train..lr=1'")


@pytest.fixture
def listener():
    """A TCP server that counts the connections it accepts (none may arrive)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    sock.close()


SUBMIT = ["submit", "retrain", "--wait"]
SCHEDULE = ["schedule", "create", "monitor", "--cron", "0 3 * * *"]


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize(
    ("args", "flag", "bound"),
    [
        ([*SUBMIT, "--timeout", "-5"], "--timeout", "above 0"),
        ([*SUBMIT, "--timeout", "0"], "--timeout", "above 0"),
        ([*SUBMIT, "--timeout", "nan"], "--timeout", "above 0"),
        ([*SUBMIT, "--timeout", "inf"], "--timeout", "above 0"),
        ([*SUBMIT, "--poll", "-1"], "--poll", "above 0"),
        ([*SCHEDULE, "--max-concurrency", "0"], "--max-concurrency", "at least 1 and at most 10"),
        ([*SCHEDULE, "--max-concurrency", "11"], "--max-concurrency", "at least 1 and at most 10"),
    ],
)
def test_a_bad_number_fails_at_parse_time_before_any_request(
    args, flag, bound, dry_run, listener, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    host, accepted = listener
    with pytest.raises(SystemExit) as info:
        main([*args, "--host", host, *dry_run])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = nonblank(err)
    assert len(lines) == 1 and f"'{flag}'" in lines[0] and f"must be a number {bound}" in lines[0]
    assert accepted == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["models"], ["schedule"]])
def test_no_arguments_print_usage_and_no_empty_error_line(args, tmp_path):
    out = flywheel(tmp_path, *args)
    assert "Usage" in out.stdout + out.stderr
    assert all(line.strip() != "error:" for line in out.stderr.splitlines()), out.stderr
