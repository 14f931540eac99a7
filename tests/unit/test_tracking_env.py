"""Resolving MLflow leaves the process environment alone (an order-dependent failure:
`mlflow.set_tracking_uri` wrote $MLFLOW_TRACKING_URI, so one profile's store became every
later profile's, and every child process's)."""

import os
import subprocess
import sys

from flywheel.config import load_profile
from flywheel.tracking import experiment_id, tracking_uri


def test_experiment_id_does_not_pin_the_process_to_its_store(state_dir, tmp_path):
    first = load_profile(None, [f"state_dir={tmp_path / 'a'}"])
    second = load_profile(None, [f"state_dir={tmp_path / 'b'}"])
    assert experiment_id(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_uri(second) == f"sqlite:///{tmp_path / 'b' / 'mlflow' / 'mlflow.db'}"
    # what a CLI subprocess started now resolves: its own state dir, not the first store
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flywheel.config import load_profile; from flywheel.tracking import "
            f"tracking_uri; print(tracking_uri(load_profile(None, ['state_dir={tmp_path / 'c'}'])))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip().endswith(f"{tmp_path / 'c'}/mlflow/mlflow.db")
