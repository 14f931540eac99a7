"""Compile pipelines to KFP IR YAML, and prove each parses by loading it back."""

from __future__ import annotations

import importlib
from pathlib import Path

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
    try:
        load_component_from_file(str(path))
    except Exception as exc:  # a YAML kfp cannot read back must never be uploaded
        raise FlywheelError(f"{path}: compiled pipeline does not load back: {exc}") from exc
    return path


def compile_all(profile: Profile, out_dir: Path) -> list[Path]:
    return [compile_pipeline(name, profile, out_dir) for name in available()]
