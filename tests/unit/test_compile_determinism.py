"""The same profile compiles to the same bytes, in any process: the package digest names the
pipeline version on Kubeflow, so a compile that varied would upload a new version each time."""

from __future__ import annotations

import os
import subprocess
import sys

from flywheel.config import CONFIG_DIR, load_profile
from flywheel.kfp.compile import available, compile_pipeline, stable_header


def _compile_in_a_new_process(out, seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel.cli.main", "compile",
         "--profile", str(CONFIG_DIR / "cluster.yaml"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_two_processes_with_different_hash_seeds_write_identical_bytes(tmp_path):
    _compile_in_a_new_process(tmp_path / "a", "1")
    _compile_in_a_new_process(tmp_path / "b", "2")
    for name in available():
        a = (tmp_path / "a" / f"{name}.yaml").read_bytes()
        b = (tmp_path / "b" / f"{name}.yaml").read_bytes()
        assert a == b, f"{name}.yaml differs between two compiles of one profile"
        assert b"platforms:" in a  # the Kubernetes section is covered too


def test_the_header_lists_the_default_profile_in_sorted_key_order(tmp_path):
    text = compile_pipeline("retrain", load_profile(None), tmp_path).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("#    profile: dict"))
    default = line.split("[Default: ", 1)[1]
    assert default.startswith("{'data': {'batch_size': ")  # 'data' < 'drift' < 'eval' < ...
    assert default.index("'drift'") < default.index("'eval'") < default.index("'gate'")


def test_stable_header_sorts_dict_defaults_and_leaves_the_rest():
    body = (
        "pipelineInfo:\n  name: p\nroot:\n  inputDefinitions:\n    parameters:\n"
        "      cfg:\n        defaultValue:\n          b: 1.0\n          a:\n            z: x\n"
        "            y: [2.0, {d: 1.0, c: 2.0}]\n        parameterType: STRUCT\n"
        "      name:\n        defaultValue: n\n        parameterType: STRING\n"
    )
    header = (
        "# PIPELINE DEFINITION\n# Name: p\n# Inputs:\n"
        "#    cfg: dict [Default: {'b': 1.0, 'a': {'z': 'x', 'y': [2.0, {'d': 1.0, 'c': 2.0}]}}]\n"
        "#    name: str [Default: 'n']\n"
    )
    out = stable_header(header + body)
    assert (
        "#    cfg: dict [Default: {'a': {'y': [2.0, {'c': 2.0, 'd': 1.0}], 'z': 'x'}, 'b': 1.0}]"
        in out
    )
    assert "#    name: str [Default: 'n']" in out
    assert out.endswith(body) and stable_header(out) == out
