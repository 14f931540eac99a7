"""Compile pipelines to KFP IR YAML, and prove each parses by loading it back.

The same profile compiles to the same bytes, so the package digest that names a pipeline
version on Kubeflow changes only when the pipeline does (see `stable_header`).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import Profile
from flywheel.errors import FlywheelError

# name -> module in pipelines/ exposing build(profile) -> pipeline function
PIPELINES = {"retrain": "pipelines.retrain", "monitor": "pipelines.monitor"}


def available() -> list[str]:
    return [name for name, mod in PIPELINES.items() if importlib.util.find_spec(mod) is not None]


def build_pipeline(name: str, profile: Profile):
    if name not in PIPELINES:
        raise FlywheelError(f"unknown pipeline '{name}' (choose from {', '.join(available())})")
    return importlib.import_module(PIPELINES[name]).build(profile)


def compile_pipeline(name: str, profile: Profile, out_dir: Path) -> Path:
    """Write `<out_dir>/<name>.yaml` for this profile and load it back with kfp."""
    from kfp import compiler
    from kfp.components import load_component_from_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    compiler.Compiler().compile(build_pipeline(name, profile), str(path))
    path.write_text(stable_header(path.read_text()))
    try:
        load_component_from_file(str(path))
    except Exception as exc:  # a YAML kfp cannot read back must never be uploaded
        raise FlywheelError(f"{path}: compiled pipeline does not load back: {exc}") from exc
    return path


def compile_all(profile: Profile, out_dir: Path) -> list[Path]:
    return [compile_pipeline(name, profile, out_dir) for name in available()]


# "#    profile: dict [Default: {...}]" in the comment block KFP writes above the YAML.
_DEFAULT_LINE = re.compile(r"^(#    (?P<name>[^:\s]+): \S+ \[Default: )(?P<value>.*)(\])$")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def stable_header(text: str) -> str:
    """KFP's header comment with dict defaults written in sorted key order.

    KFP prints a dict parameter's default (the profile) in the iteration order of a protobuf
    Struct, which differs from process to process; the YAML below it is already sorted.
    Sorting the comment the same way makes a compile byte-for-byte repeatable.
    """
    lines = text.split("\n")
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    defaults: dict[str, Any] = {}
    docs = [d for d in yaml.safe_load_all("\n".join(lines[header:])) if isinstance(d, dict)]
    for doc in docs:
        params = doc.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        defaults.update({k: v["defaultValue"] for k, v in params.items() if "defaultValue" in v})
    for i in range(header):
        m = _DEFAULT_LINE.match(lines[i])
        if m and isinstance(defaults.get(m["name"]), (dict, list)):
            lines[i] = f"{m.group(1)}{_sorted(defaults[m['name']])}{m.group(4)}"
    return "\n".join(lines)
