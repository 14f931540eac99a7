"""Kubeflow pods, as far as one machine can make them: the image's install, nothing else.

On Kubeflow a task is a fresh pod started from the component image. It holds the package
installed from its wheel (no checkout), an empty working directory and HOME, the environment
the image sets plus the Secrets the compiled YAML injects, its input artifacts, and the
services named in the profile. kfp.local is kinder: every task shares the driver's working
directory, environment and the editable checkout. This module takes each of those away:

- `image_python`: flywheel built into a wheel and installed NON-editable into a fresh
  virtual environment outside the checkout (what `containers/install.sh package .` does in
  the image). Third-party dependencies are shared read-only from the test environment's
  site-packages through a .pth line: rebuilding the image's dependency layer would cost
  minutes and tests nothing of ours. A .pth-added directory's own .pth files are not
  processed, so the checkout's editable-install hook does not come along.
- `PodLauncher`: a wrapper that kfp.local's SubprocessRunner runs as "python3" for every task
  (kfp.local runs tasks with the driver's `sys.executable`; the driver sets it to the
  wrapper). Each task gets a new empty working directory, HOME, TMPDIR and RAY_TMPDIR, an
  environment rebuilt from nothing (`env -i`) holding only the image's variables and the
  secret-backed variables the YAML's `platforms:` section declares, and its directory is
  deleted when the task exits, as a pod's disk is. A task that reads the checkout, the
  driver's working directory or a file another task wrote outside KFP artifacts fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Any

import yaml

CHECKOUT = Path(__file__).resolve().parents[1]
# What the image copies before `install.sh package .` (containers/Dockerfile).
IMAGE_SOURCES = ("pyproject.toml", "README.md", "flywheel", "components", "pipelines")
# Environment the image itself sets (containers/Dockerfile `ENV`), plus what any pod on this
# machine needs: no hub access from tests, no Ray usage reporting.
IMAGE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "LANG": "C.UTF-8",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

DRIVER = """
import json, sys
from kfp import local
from kfp.components import load_component_from_file

yaml_path, root, launcher, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
# kfp.local's SubprocessRunner(use_venv=False) starts every task with sys.executable: the
# pod launcher stands in for the image's python3.
sys.executable = launcher
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=False)
load_component_from_file(yaml_path)(**args)
"""


def build_wheel(out: Path) -> Path:
    """flywheel's wheel, built from a copy of exactly what the image copies."""
    src = out / "src"
    for name in IMAGE_SOURCES:
        path = CHECKOUT / name
        if path.is_dir():
            shutil.copytree(
                path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    dist = out / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(src)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = dist.glob("flywheel-*.whl")
    return wheel


def image_python(root: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed non-editable; returns its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    py = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "image_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return py


def secret_env_names(compiled_yaml: Path) -> dict[str, tuple[str, str]]:
    """env var -> (secret name, secret key), from the YAML's kubernetes platform spec."""
    docs = list(yaml.safe_load_all(compiled_yaml.read_text()))
    out: dict[str, tuple[str, str]] = {}
    for doc in docs:
        executors = (
            (doc or {}).get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
        ).get("executors", {})
        for spec in executors.values():
            for item in spec.get("secretAsEnv", []):
                name = item.get("secretName") or item.get("secretNameParameter", {}).get(
                    "runtimeValue", {}
                ).get("constant")
                for pair in item.get("keyToEnv", []):
                    out[pair["envVar"]] = (name, pair["secretKey"])
    return out


class PodLauncher:
    """Writes the per-task wrapper and runs compiled pipelines through kfp.local with it."""

    def __init__(self, root: Path, image_py: Path, env: dict[str, str]):
        self.root = root
        self.image_py = image_py
        self.pods = root / "pods"  # short: Ray's socket paths must stay under 107 bytes
        self.pods.mkdir(parents=True, exist_ok=True)
        self.ledger = root / "pods.jsonl"
        self.pipeline_root = root / "kfp-root"
        self.script = root / "pod-python"
        self.set_env(env)

    def set_env(self, env: dict[str, str]) -> None:
        pod_env = {**IMAGE_ENV, **env, "PATH": f"{self.image_py.parent}:/usr/bin:/bin"}
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(pod_env.items()))
        self.script.write_text(
            f"""#!/bin/sh
# One task, one pod: fresh dirs, an environment rebuilt from nothing, deleted at exit.
pod=$(mktemp -d {shlex.quote(str(self.pods))}/XXXXXX) || exit 97
mkdir "$pod/h" "$pod/w" "$pod/t"
cd "$pod/w" || exit 97
env -i {assigns} HOME="$pod/h" TMPDIR="$pod/t" RAY_TMPDIR="$pod/t" \\
  {shlex.quote(str(self.image_py))} "$@"
rc=$?
printf '{{"pod": "%s", "rc": %d}}\\n' "$pod" "$rc" >> {shlex.quote(str(self.ledger))}
rm -rf "$pod"
exit $rc
"""
        )
        self.script.chmod(0o755)

    def run(self, compiled_yaml: Path, arguments: dict[str, Any], log: Path) -> PodRun:
        """Run one compiled pipeline; every task in its own pod. Returns status and run dir."""
        self.pipeline_root.mkdir(exist_ok=True)
        before = {p.name for p in self.pipeline_root.iterdir()}
        driver_dir = self.root / "driver"
        driver_dir.mkdir(exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.run(
                [str(self.image_py), "-c", DRIVER, str(compiled_yaml), str(self.pipeline_root),
                 str(self.script), json.dumps(arguments)],
                cwd=driver_dir, stdout=out, stderr=subprocess.STDOUT, check=False,
                env={**IMAGE_ENV, "PATH": os.environ["PATH"], "HOME": str(driver_dir)},
                timeout=1500,
            )  # fmt: skip
        text = log.read_text()
        new = sorted(p for p in self.pipeline_root.iterdir() if p.name not in before)
        status = "SUCCESS" if "finished with status SUCCESS" in _pipeline_line(text) else "FAILURE"
        return PodRun(status, new[-1] if new else None, log, proc.returncode)

    def pods_run(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines() if line]


class PodRun:
    def __init__(self, status: str, run_dir: Path | None, log: Path, rc: int):
        self.status, self.run_dir, self.log, self.rc = status, run_dir, log, rc

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCESS"

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:]

    def output(self, task: str, name: str = "Output") -> Any:
        """A task's output parameter, read from its executor_output.json."""
        assert self.run_dir is not None
        data = json.loads((self.run_dir / task / "executor_output.json").read_text())
        return data.get("parameterValues", {}).get(name)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _pipeline_line(text: str) -> str:
    text = ANSI.sub("", text)
    lines = [ln for ln in text.splitlines() if "Pipeline '" in ln and "finished with status" in ln]
    return lines[-1] if lines else ""
