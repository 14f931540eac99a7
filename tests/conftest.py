"""Shared fixtures. Tiers: unit (default selection), integration, gpu (see pyproject)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures_data import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = REPO.parent / "shared" / "contracts"

# Ray and DeepSpeed should not reach for the network or a GPU in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_running(request):
    """A module that leaves Ray up in this process slows every later test (its raylet and
    workers keep running) and fools the tests that check work is refused before Ray
    starts. Fixtures that start Ray stop it (`ray_workdir`); so must stages (they stop
    what they started). Set up first, torn down last: after every other module fixture."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.module.__name__} left Ray running in the test process")


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI for the process, so a test that
    talked to a server (since stopped) would otherwise hand its URI to every later test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """Run in a fresh working directory so `.flywheel/` lands in tmp, never in the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Pinned: the default state_dir would otherwise also find a stray .flywheel above tmp
    # (say /tmp/.flywheel), as it finds a project's from a subdirectory.
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / ".flywheel"))
    return tmp_path / ".flywheel"


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_profile(state_dir, tiny_overrides):
    from flywheel.config import load_profile

    return load_profile(None, tiny_overrides)


@pytest.fixture(scope="session")
def contracts_dir() -> Path:
    if not CONTRACTS.is_dir():
        pytest.skip(f"official API contracts not found at {CONTRACTS} (shared/ is absent)")
    return CONTRACTS


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `flywheel ARGS` in this process: (exit code, stdout, non-blank stderr lines)."""
    from flywheel.cli.common import console, err_console
    from flywheel.cli.main import main

    monkeypatch.setenv("COLUMNS", "400")  # one error line stays one line

    def run(*args: str) -> tuple[int, str, list[str]]:
        # A console given no file writes to whatever sys.stdout/stderr is at each print (here:
        # the capture); another test may have pinned one to its own, since closed, capture.
        console.file = None
        err_console.file = None
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, [line for line in out.err.splitlines() if line.strip()]

    yield run
    console.file = None
    err_console.file = None
