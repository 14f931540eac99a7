"""The `flywheel` command in a subprocess, as a user runs it (for exit codes and stderr)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def flywheel(cwd: Path | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`flywheel ARGS` run in `cwd` (None: this process's directory)."""
    return subprocess.run(
        [sys.executable, "-m", "flywheel.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def nonblank(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]
