"""Re-pin the two lock files from the current environment (`make lock`).

requirements.lock      what flywheel needs at run time: the component image installs only this
requirements-dev.lock  the rest of the environment (tests, lint, the embeddings extra, benchmarks)

The runtime set is the closure of flywheel's own requirements (no extras) over the installed
distributions' metadata, so nothing is asked of a package index.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# torch: installed first, per accelerator (containers/install.sh); pip: upgraded by install.sh.
# setuptools is pinned (--all): grpcio-tools needs a newer one than venv ships.
UNPINNED = {"torch", "flywheel", "pip"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(top: str = "flywheel") -> set[str]:
    seen: set[str] = set()
    todo = [(top, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = norm(name)
        if key in seen and not extras:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def main() -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    pins = [p for p in frozen if "==" in p and norm(p.split("==")[0]) not in UNPINNED]
    runtime = runtime_closure()
    rt = [p for p in pins if norm(p.split("==")[0]) in runtime]
    dev = [p for p in pins if norm(p.split("==")[0]) not in runtime]
    (ROOT / "requirements.lock").write_text("\n".join(rt) + "\n")
    (ROOT / "requirements-dev.lock").write_text("\n".join(dev) + "\n")
    print(f"requirements.lock: {len(rt)} pins, requirements-dev.lock: {len(dev)} pins")


if __name__ == "__main__":
    main()
