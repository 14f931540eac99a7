"""What configs/cluster.yaml compiles to besides its Kubernetes settings (test_compile_k8s.py):
the image each task runs in (kfp.image, or kfp.control_image for the control tasks) and the
retry policy a retried task carries."""

from __future__ import annotations

import re

import pytest
import yaml

from flywheel import contracts
from flywheel.config import CONFIG_DIR, CONTROL_TASKS, TASKS, load_profile
from flywheel.kfp.compile import available, compile_pipeline

CLUSTER = CONFIG_DIR / "cluster.yaml"
# The tasks that run Ray stages or score on the GPUs kfp.resources gives them: the full image.
FULL = {
    contracts.PREPARE_DATA,
    contracts.TUNE,
    contracts.TRAIN,
    contracts.EVALUATE,
    contracts.EVALUATE_CHAMPION,
}


def _spec(path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))


def _dags(spec: dict) -> list[dict]:
    return [spec["root"], *(c for c in spec["components"].values() if "dag" in c)]


def _images(spec: dict) -> dict[str, str]:
    """Task name -> the image of its executor, over every DAG (a nested pipeline included)."""
    executors = spec["deploymentSpec"]["executors"]
    out: dict[str, str] = {}
    for dag in _dags(spec):
        for name, task in dag["dag"]["tasks"].items():
            label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if label:  # a DAG (condition, nested pipeline) has no executor
                out[name] = executors[label]["container"]["image"]
    return out


def _compiled(tmp_path, overrides: list[str]) -> dict[str, dict]:
    p = load_profile(CLUSTER, overrides)
    return {name: _spec(compile_pipeline(name, p, tmp_path)) for name in available()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    return _compiled(tmp_path_factory.mktemp("cluster"), [])


# ------------------------------------------------------------------ images


def test_the_control_tasks_are_those_that_run_no_ray_stage():
    assert set(CONTROL_TASKS) == set(TASKS) - FULL
    assert set(CONTROL_TASKS) == {
        "plan",
        "skip-tune",
        "gate",
        "promote",
        "summary",
        "drift-check",
        "no-retrain",
    }


def test_cluster_profile_runs_control_tasks_in_the_cpu_image(cluster):
    p = load_profile(CLUSTER)
    image, control = p.kfp.image, p.kfp.control_image
    assert control and control != image
    assert re.fullmatch(r".+@sha256:[0-9a-f]{64}", control), "control image pinned by digest"
    seen: set[str] = set()
    for name, spec in cluster.items():
        images = _images(spec)
        seen |= set(images)
        for task, used in images.items():
            want = image if task in FULL else control
            assert used == want, f"{name}: {task} runs in {used}, expected {want}"
    assert seen == set(TASKS), "every task of both pipelines was checked"


def test_unset_control_image_means_every_task_uses_kfp_image(tmp_path):
    compiled = _compiled(tmp_path, ["kfp.control_image=null"])
    image = load_profile(CLUSTER).kfp.image
    for name, spec in compiled.items():
        assert set(_images(spec).values()) == {image}, name


def test_a_control_task_given_an_accelerator_keeps_the_full_image(tmp_path):
    gpu = "{cpu: '4', memory: 16Gi, accelerator_type: nvidia.com/gpu, accelerator_count: 1}"
    p = load_profile(CLUSTER, [f"kfp.resources.drift-check={gpu}"])
    images = _images(_spec(compile_pipeline("monitor", p, tmp_path)))
    assert images["drift-check"] == p.kfp.image
    assert images["no-retrain"] == images["gate"] == p.kfp.control_image


# ------------------------------------------------------------------ retries

# What configs/cluster.yaml's `kfp.resources.train.retries: 2` compiles to. KFP 2.17's IR has
# no field for Argo's retryPolicy: a retry covers a container that exits non-zero, never a
# deleted or evicted pod (see TaskResources.retries). backoffMaxDuration is Argo's retry
# window from the first attempt's start, hence retry_window_hours (168 h) over KFP's 1 h.
TRAIN_RETRY = {
    "maxRetryCount": 2,
    "backoffDuration": "0s",
    "backoffFactor": 2.0,
    "backoffMaxDuration": "604800s",
}


def _retry_policies(spec: dict) -> dict[str, dict]:
    return {
        name: task["retryPolicy"]
        for dag in _dags(spec)
        for name, task in dag["dag"]["tasks"].items()
        if "retryPolicy" in task
    }


def test_cluster_profile_retries_train_only_with_a_pinned_policy(cluster):
    assert load_profile(CLUSTER).kfp.for_task("train").retries == 2
    # the retrain pipeline, and the same retrain nested in the monitor
    for name in ("retrain", "monitor"):
        assert _retry_policies(cluster[name]) == {"train": TRAIN_RETRY}, name


def test_the_retry_window_comes_from_the_profile(tmp_path):
    p = load_profile(CLUSTER, ["kfp.resources.train.retry_window_hours=1.5"])
    policies = _retry_policies(_spec(compile_pipeline("retrain", p, tmp_path)))
    assert policies["train"] == {**TRAIN_RETRY, "backoffMaxDuration": "5400s"}
