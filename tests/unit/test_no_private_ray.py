"""No module of the package reaches into Ray's (or Ray's Optuna searcher's) private names:
they change without notice between Ray releases and pinned Ray below 2.61 (issue 13)."""

from __future__ import annotations

import re
from pathlib import Path

import flywheel

PACKAGE = Path(flywheel.__file__).parent
FORBIDDEN = [
    re.compile(r"ray(\.\w+)*\._internal"),
    re.compile(r"ray\._raylet"),
    re.compile(r"_initialize_and_run_controller"),
    re.compile(r"\b_ot_trials\b"),
    re.compile(r"\b_completed_trials\b"),
    re.compile(r"\b_ot_study\b"),
]


def hits(text: str) -> list[str]:
    return [m.group(0) for pattern in FORBIDDEN for m in pattern.finditer(text)]


def test_the_patterns_catch_what_the_old_tuning_code_did():
    old = (
        "from ray.train.v2._internal.execution.controller import TrainController\n"
        "ray._raylet.RAY_NODE_ID_KEY\n"
        "def _initialize_and_run_controller(self): ...\n"
        "self._ot_trials[t]; self._completed_trials.add(t); self._ot_study.tell(t)\n"
    )
    assert len(hits(old)) == 6
    assert hits("import ray.train\nfrom ray.util.queue import Queue\n") == []


def test_no_module_uses_a_private_ray_name():
    found = {
        str(f.relative_to(PACKAGE)): h
        for f in sorted(PACKAGE.rglob("*.py"))
        if (h := hits(f.read_text(encoding="utf-8")))
    }
    assert not found, found
