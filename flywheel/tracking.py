"""Where MLflow lives: one resolution shared by training, tuning and the registry.

Order: ``registry.tracking_uri`` in the profile, else ``$MLFLOW_TRACKING_URI``, else a
SQLite store under the profile's state directory (``.flywheel/mlflow/mlflow.db``) with
artifacts next to it. The environment is read here, at run time, and nowhere else, so a
compiled pipeline never carries whoever compiled it.

Artifacts: a tracking server started with ``--no-serve-artifacts`` and an s3:// default
artifact root only records where a run's artifacts are; every client uploads and downloads
them itself, through boto3, which finds an S3-compatible store (MinIO, Ceph) only through
``$MLFLOW_S3_ENDPOINT_URL``. The profile names that store once, ``storage.endpoint_url``, and
`tracking_uri` (which every MLflow client here is built from, so it runs before any artifact
moves) passes it on: without it a pod's model upload went to AWS.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flywheel.config import Profile

# What MLflow's S3 artifact repository (boto3) reads for its endpoint, on every client it makes.
S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
# The value `_artifacts_endpoint` last set, so a later profile in the same process replaces
# it, while a value set by whoever started the process is never touched.
_endpoint_set_here: str | None = None


def _local_store(profile: Profile) -> Path:
    return profile.state_path("mlflow")


def _artifacts_endpoint(profile: Profile) -> None:
    """Point MLflow's S3 artifact client at ``storage.endpoint_url``, unless
    $MLFLOW_S3_ENDPOINT_URL came from the environment (an explicit setting wins: a store of
    MLflow's own). MLflow takes the endpoint from the environment only (no client argument),
    so the process environment is the only public knob; it is also what Ray workers and
    subprocesses started afterwards inherit."""
    global _endpoint_set_here
    current = os.environ.get(S3_ENDPOINT_ENV)
    if current is not None and current != _endpoint_set_here:
        return
    wanted = profile.storage.endpoint_url
    if wanted:
        os.environ[S3_ENDPOINT_ENV] = wanted
    elif current is not None:
        del os.environ[S3_ENDPOINT_ENV]  # this profile's store is AWS's own
    _endpoint_set_here = wanted or None


def tracking_uri(profile: Profile) -> str:
    """The MLflow tracking URI for a profile (see the module docstring for the order); also
    points MLflow's artifact client at the profile's S3 endpoint (module docstring)."""
    _artifacts_endpoint(profile)
    if profile.registry.tracking_uri:
        return profile.registry.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{_local_store(profile) / 'mlflow.db'}"


def artifact_location(profile: Profile) -> str | None:
    """Artifact root for experiments this project creates.

    A local file store under the state dir when tracking is a local database or path; None
    for a tracking server, which owns its artifact store (``--default-artifact-root`` or
    proxied artifacts) and should not be handed a path on this machine.
    """
    uri = tracking_uri(profile)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    path = _local_store(profile) / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def experiment_id(profile: Profile, name: str | None = None) -> str:
    """Get or create the profile's experiment (``registry.experiment``) and return its id.

    Through a client bound to the profile's URI, never `mlflow.set_tracking_uri`: that
    also writes $MLFLOW_TRACKING_URI, which `tracking_uri` reads before the state dir, so
    every later profile in this process, and every process it starts, would use this
    profile's store (a CLI subprocess in another working directory used the store of an
    earlier test). Nothing here uses MLflow's fluent API, which needs the process URI.
    """
    import mlflow

    exp_name = name or profile.registry.experiment
    client = mlflow.MlflowClient(tracking_uri(profile))
    exp = client.get_experiment_by_name(exp_name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(exp_name, artifact_location=artifact_location(profile))
    except Exception:
        # Two processes racing to create it: the loser reads the winner's.
        exp = client.get_experiment_by_name(exp_name)
        if exp is None:
            raise
        return exp.experiment_id


def log_dataset_samples(profile: Profile, training_run_id: str, dataset_dir: Path) -> None:
    """Keep the dataset's text samples with the training run (under `data/`), where the
    monitor finds them by lineage: the drift reference, and the held-out split the
    champion is scored on (performance drift)."""
    import mlflow

    from flywheel.artifacts import REFERENCE_TEXT, TEST_TEXT
    from flywheel.contracts import SAMPLES_DIR

    client = mlflow.MlflowClient(tracking_uri(profile))
    for sample in (dataset_dir / REFERENCE_TEXT, dataset_dir / TEST_TEXT):
        if sample.is_file():
            client.log_artifact(training_run_id, str(sample), SAMPLES_DIR)


def git_commit() -> str | None:
    """The commit of the working tree this code runs from, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None
