"""Fixtures shared by the integration tier."""

from __future__ import annotations

import pytest

from flywheel.config import load_profile


@pytest.fixture(scope="module")
def ray_workdir(tmp_path_factory, request):
    """A module-wide working directory (the state dir lands in it) with one local Ray up.

    Starting Ray costs 5-15 s here; a module's tests share one instance instead of each
    stage starting and stopping its own (stages leave a Ray they did not start alone).
    """
    from flywheel.runtime import ray_session

    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    with ray_session(load_profile(None, []).ray):
        yield root
    mp.undo()
