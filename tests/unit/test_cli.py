"""The CLI's contract: every command listed; errors are one readable line and a non-zero exit."""

from __future__ import annotations

import subprocess

import fixtures_cli
import pytest

EXPECTED = [
    "run",
    "compile",
    "monitor",
    "submit",
    "schedule",
    "data",
    "train",
    "tune",
    "evaluate",
    "models",
    "drift",
]


def flywheel(*args: str) -> subprocess.CompletedProcess:
    return fixtures_cli.flywheel(None, *args, timeout=120)


def test_help_lists_every_command():
    out = flywheel("--help")
    assert out.returncode == 0
    missing = [c for c in EXPECTED if f" {c} " not in out.stdout]
    assert not missing, f"flywheel --help does not list {missing}"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["run", "train.nope=1"],
            2,
            "local.yaml (with overrides train.nope=1): train.nope: unknown field",
        ),
        (["compile", "model.n_head=3"], 2, "must be divisible by model.n_head (3)"),
        (["run", "--profile", "/nonexistent.yaml"], 2, "/nonexistent.yaml: profile not found"),
        (["bogus"], 2, "No such command 'bogus'"),
    ],
)
def test_errors_are_one_line_without_traceback(args, code, message):
    out = flywheel(*args)
    assert out.returncode == code
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_verbose_shows_the_traceback():
    out = flywheel("--verbose", "run", "train.nope=1")
    assert out.returncode != 0
    assert "Traceback" in out.stderr
