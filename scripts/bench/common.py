"""What the bench scripts share: the machine line of a result, the result file, the table.

Imported by its name (`from common import ...`): a script runs with its own folder first
on sys.path.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Where a bench ran: its numbers are read against the cores and the load beside them."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }


def write_result(out: Path, result: dict[str, Any]) -> None:
    """`result` as JSON at `out` (values JSON does not know, such as paths, as strings)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


def print_table(
    corner: str, headers: Sequence[str], rows: Iterable[tuple[str, Sequence[str]]]
) -> None:
    """A fixed-width table: a 12-wide label column, then 20-wide right-aligned cells."""
    print(f"{corner:<12}" + "".join(f"{h:>20}" for h in headers))
    for label, cells in rows:
        print(f"{label:<12}" + "".join(f"{c:>20}" for c in cells))
