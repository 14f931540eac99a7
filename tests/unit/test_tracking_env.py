"""Resolving MLflow leaves the process environment alone (an order-dependent failure:
`mlflow.set_tracking_uri` wrote $MLFLOW_TRACKING_URI, so one profile's store became every
later profile's, and every child process's)."""

import os
import subprocess
import sys

from flywheel.config import load_profile
from flywheel.tracking import S3_ENDPOINT_ENV, experiment_id, tracking_uri


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


def _with_endpoint(url: str | None):
    return load_profile(
        None, [f"storage.endpoint_url={url}" if url else "storage.endpoint_url=null"]
    )


def test_mlflow_artifact_uploads_use_the_profiles_s3_endpoint(monkeypatch):
    """A tracking server that does not proxy artifacts has clients write to S3 with boto3,
    which finds an S3-compatible store only through $MLFLOW_S3_ENDPOINT_URL."""
    monkeypatch.setenv(S3_ENDPOINT_ENV, "placeholder")
    monkeypatch.delenv(S3_ENDPOINT_ENV)  # absent now, and removed again after the test
    tracking_uri(_with_endpoint("http://minio.example:9000"))
    assert os.environ[S3_ENDPOINT_ENV] == "http://minio.example:9000"
    # a later profile in the same process replaces what the first one set ...
    tracking_uri(_with_endpoint("http://ceph.example:7480"))
    assert os.environ[S3_ENDPOINT_ENV] == "http://ceph.example:7480"
    # ... and one on AWS's own S3 removes it
    tracking_uri(_with_endpoint(None))
    assert S3_ENDPOINT_ENV not in os.environ


def test_an_mlflow_s3_endpoint_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv(S3_ENDPOINT_ENV, "http://mlflow-store.example:9000")
    tracking_uri(_with_endpoint("http://minio.example:9000"))
    tracking_uri(_with_endpoint(None))
    assert os.environ[S3_ENDPOINT_ENV] == "http://mlflow-store.example:9000"
