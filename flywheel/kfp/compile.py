"""Compile pipelines to KFP IR YAML, and prove each parses by loading it back.

The same profile compiles to the same bytes, so the package digest that names a pipeline
version on Kubeflow changes only when the pipeline does (see `stable_header`).
"""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import Profile
from flywheel.errors import FlywheelError

# The pipelines register their `build(profile) -> pipeline function` under this entry-point
# group (pyproject.toml, [project.entry-points]): pipelines/ depends on the library, and the
# library finds them through the installed package's metadata, never by importing upward.
ENTRY_POINT_GROUP = "flywheel.pipelines"


def _builders() -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if not found:
        # The metadata comes from the install: an old install, or a stale flywheel.egg-info
        # in the working directory (it wins on sys.path), lists none.
        raise FlywheelError(
            f"no pipelines registered under the entry-point group '{ENTRY_POINT_GROUP}': "
            "reinstall flywheel (make setup), or remove a stale flywheel.egg-info here"
        )
    return found


def available() -> list[str]:
    return sorted(_builders())


def build_pipeline(name: str, profile: Profile):
    builders = _builders()
    if name not in builders:
        raise FlywheelError(f"unknown pipeline '{name}' (choose from {', '.join(available())})")
    return builders[name].load()(profile)


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
