"""The check before Kubeflow: would this profile keep state inside a pod?

`flywheel run` is forgiving because every kfp.local task shares this machine's working
directory and `.flywheel/`. On Kubeflow each task is a fresh pod holding only the image and
its input artifacts: a SQLite registry written by the gate is gone before promote starts,
an Optuna study and Ray's checkpoints vanish with their pod, and a path on this machine
does not exist there. `pod_state_problems` lists each such setting as one sentence naming
the field and what to set instead; `flywheel submit` and `flywheel schedule create` refuse
a profile with any (exit 2), `flywheel compile` prints them as warnings and compiles.

Pure: it reads the profile and nothing else (no environment, no network).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from flywheel.config import TASKS, KubernetesConfig, Profile
from flywheel.storage import is_remote

TRACKING_EXAMPLE = "http://mlflow.mlflow.svc:5000"
TUNE_EXAMPLE = "postgresql+psycopg2://optuna@postgres.db.svc:5432/optuna"
STORAGE_EXAMPLE = "s3://bucket/flywheel"
# Tracking URIs whose store is shared by every pod: an MLflow server (which also serves
# the artifacts) or Databricks. A database URI shares runs but not their artifacts: MLflow
# would write models under the pod's state directory.
SHARED_TRACKING = ("http://", "https://", "databricks")
_NOT_SHARED = "a pod cannot read this machine's files and its own disk vanishes with it"


def _masked(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _has_password(uri: str) -> bool:
    try:
        return bool(urlsplit(uri).password)
    except ValueError:
        return False


def _on_shared_claim(path: str, k8s: KubernetesConfig) -> bool:
    """Whether an absolute path lies on a PVC that every task mounts."""
    return any(
        not pvc.tasks
        and (path == pvc.mount_path or path.startswith(pvc.mount_path.rstrip("/") + "/"))
        for pvc in k8s.pvcs
    )


def _pod_local(value: str, k8s: KubernetesConfig) -> bool:
    """A path or file:// URI that would be read or written on a pod's own disk."""
    if is_remote(value):
        return False
    path = value.removeprefix("file://")
    return not (path.startswith("/") and _on_shared_claim(path, k8s))


def _looks_local(name: str) -> bool:
    """data.source.path of kind hf is a hub id (org/name) unless it is written as a path."""
    return name.startswith(("/", "./", "../", "~", "file://")) or name in (".", "..")


def _where_instead(field: str) -> str:
    return (
        f"set {field} to an s3:// or gs:// URI (or a path under a PVC every task mounts, "
        "kfp.kubernetes.pvcs)"
    )


def pod_state_problems(profile: Profile, data_location: str | None = None) -> list[str]:
    """Every setting that would keep state in, or read it from, a single pod; empty if none.

    `data_location` is the run's `--data-location` (retrain's data_location, the monitor's
    window), checked like the profile's paths.
    """
    problems: list[str] = []
    k8s = profile.kfp.kubernetes

    uri = profile.registry.tracking_uri
    from_secret = all("MLFLOW_TRACKING_URI" in k8s.env_from_secrets(t) for t in TASKS)
    if not uri and not from_secret:
        problems.append(
            "registry.tracking_uri is unset: each pod would keep MLflow (registry and run "
            "ledger) in its own SQLite file, so promote could not find what gate registered; "
            f"set it to an MLflow tracking server ({TRACKING_EXAMPLE})"
        )
    elif uri and not uri.startswith(SHARED_TRACKING):
        kind = "a SQLite file" if uri.startswith("sqlite") else "not a tracking server"
        problems.append(
            f"registry.tracking_uri {_masked(uri)!r} is {kind}: pods would not share the "
            f"registry or the model artifacts; set an MLflow tracking server ({TRACKING_EXAMPLE})"
        )
    if uri and _has_password(uri):
        problems.append(
            "registry.tracking_uri carries a password, which would be compiled into the "
            "pipeline YAML; drop it and give MLFLOW_TRACKING_USERNAME/PASSWORD from a Secret "
            "(kfp.kubernetes.secrets)"
        )

    storage = profile.tune.storage
    if profile.tune.enabled and (not storage or storage.startswith("sqlite")):
        what = "is unset" if not storage else f"{_masked(storage)!r} is SQLite"
        problems.append(
            f"tune.storage {what}: the Optuna study would live in a pod's own file and vanish "
            f"with it; set a PostgreSQL URL without the password ({TUNE_EXAMPLE}) and give "
            "PGPASSWORD from a Secret (kfp.kubernetes.secrets)"
        )
    if storage and _has_password(storage):
        problems.append(
            "tune.storage carries a password, which would be compiled into the pipeline YAML; "
            "drop it and give PGPASSWORD from a Secret (kfp.kubernetes.secrets)"
        )

    root = profile.storage.root
    if not root:
        problems.append(
            "storage.root is unset: Ray checkpoints and run data would stay on the pod's disk, "
            "so a retried train step would start from step 0; "
            f"set it to object storage ({STORAGE_EXAMPLE})"
        )
    elif _pod_local(root, k8s):
        problems.append(
            f"storage.root {root!r} is a local path: {_NOT_SHARED}; "
            + _where_instead("storage.root")
        )

    source = profile.data.source
    if source.path and (
        (source.kind == "files" and _pod_local(source.path, k8s))
        or (source.kind == "hf" and _looks_local(source.path) and _pod_local(source.path, k8s))
    ):
        problems.append(
            f"data.source.path {source.path!r} is a local path: {_NOT_SHARED}; "
            + _where_instead("data.source.path")
        )

    window = profile.drift.window
    if window and _pod_local(window, k8s):
        problems.append(
            f"drift.window {window!r} is a local path: {_NOT_SHARED}; "
            + _where_instead("drift.window")
        )

    if data_location and _pod_local(data_location, k8s):
        problems.append(
            f"--data-location {data_location!r} is a local path: {_NOT_SHARED}; "
            "pass an s3:// or gs:// URI (or a path under a PVC every task mounts)"
        )
    return problems
