"""Kubernetes settings from the profile in the compiled YAML's `platforms: kubernetes:` spec
(kfp-kubernetes), and what never reaches it: secret values from the environment."""

from __future__ import annotations

import pytest
import yaml

from flywheel.config import CONFIG_DIR, TASKS, load_profile
from flywheel.kfp.compile import available, compile_pipeline

CLUSTER = CONFIG_DIR / "cluster.yaml"


def _docs(path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes executor configs by executor) of a compiled file."""
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = (
        docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    )
    return docs[0], platform


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    out = tmp_path_factory.mktemp("k8s")
    return {name: _docs(compile_pipeline(name, load_profile(CLUSTER), out)) for name in available()}


def _secrets(executor: dict) -> dict[str, dict[str, str]]:
    """Secret name -> {env var: secret key} of one executor."""
    return {
        s["secretName"]: {m["envVar"]: m["secretKey"] for m in s["keyToEnv"]}
        for s in executor.get("secretAsEnv", [])
    }


def test_gpu_tasks_land_on_the_gpu_pool_with_shared_memory(cluster):
    _, k8s = cluster["retrain"]
    for executor in ("exec-train", "exec-tune"):
        cfg = k8s[executor]
        assert cfg["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "gpu-a100"}
        assert cfg["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        shm = [m for m in cfg["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "32Gi"}
        ]
    # CPU-only bookkeeping stays off the GPU pool
    assert "nodeSelector" not in k8s["exec-plan"] and "tolerations" not in k8s["exec-gate"]
    # the champion's evaluation takes evaluate's shape (its own key, falling back)
    assert k8s["exec-evaluate-champion"]["nodeSelector"] == k8s["exec-evaluate"]["nodeSelector"]


def test_secrets_reach_the_pods_that_use_them_as_environment_variables(cluster):
    spec, k8s = cluster["retrain"]
    mlflow = {"MLFLOW_TRACKING_USERNAME": "username", "MLFLOW_TRACKING_PASSWORD": "password"}
    s3 = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key"}
    for executor in spec["deploymentSpec"]["executors"]:
        if executor == "exec-skip-tune":  # returns {} and talks to nothing
            continue
        secrets = _secrets(k8s[executor])
        assert secrets["flywheel-mlflow"] == mlflow, executor
        assert secrets["flywheel-s3"] == s3, executor
        # the database password only where the study is opened (and plan's preflight)
        opens_db = executor in ("exec-tune", "exec-plan")
        assert ("flywheel-postgres" in secrets) == opens_db, executor
    assert _secrets(k8s["exec-tune"])["flywheel-postgres"] == {"PGPASSWORD": "password"}
    optional = {s["secretName"]: s["optional"] for s in k8s["exec-train"]["secretAsEnv"]}
    assert optional == {"flywheel-mlflow": True, "flywheel-s3": False}


def test_scratch_space_is_a_sized_emptydir_and_tmpdir_points_there(cluster):
    spec, k8s = cluster["retrain"]
    scratch = [m for m in k8s["exec-train"]["emptyDirMounts"] if m["mountPath"] == "/scratch"]
    assert scratch == [{"volumeName": "scratch", "mountPath": "/scratch", "sizeLimit": "200Gi"}]
    env = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]
    assert {"name": "TMPDIR", "value": "/scratch"} in env
    assert "env" not in spec["deploymentSpec"]["executors"]["exec-gate"]["container"]


def test_the_monitor_and_its_nested_retrain_get_the_same_settings(cluster):
    _spec, k8s = cluster["monitor"]
    assert _secrets(k8s["exec-drift-check"])["flywheel-s3"]
    assert k8s["exec-train"]["nodeSelector"]["labels"]
    assert {"AWS_SECRET_ACCESS_KEY"} <= set(_secrets(k8s["exec-no-retrain"])["flywheel-s3"])


def test_claims_and_pull_secrets_from_the_profile(tmp_path):
    p = load_profile(
        CLUSTER,
        [
            "kfp.kubernetes.pvcs=[{name: hf-cache, mount_path: /models, sub_path: hub, "
            "tasks: [train, evaluate]}, {name: shared, mount_path: /shared}]",
            "kfp.kubernetes.image_pull_secrets=[regcred]",
        ],
    )
    _, k8s = _docs(compile_pipeline("retrain", p, tmp_path))

    def claims(executor):
        return {
            m["constant"]: (m["mountPath"], m.get("subPath", "")) for m in k8s[executor]["pvcMount"]
        }

    assert claims("exec-train") == {"hf-cache": ("/models", "hub"), "shared": ("/shared", "")}
    assert claims("exec-gate") == {"shared": ("/shared", "")}
    assert k8s["exec-gate"]["imagePullSecret"][0]["secretName"] == "regcred"


def test_every_task_is_configured_by_a_known_name(tmp_path):
    """Each task gets the node selector of its own kfp.resources entry: a task configured by
    a name outside TASKS (or by another task's name) would show here."""
    overrides = [f"kfp.resources.{task}={{node_selector: {{task: {task}}}}}" for task in TASKS]
    p = load_profile(None, overrides)
    seen = {}
    for name in available():
        _spec, k8s = _docs(compile_pipeline(name, p, tmp_path))
        for executor, cfg in k8s.items():
            seen[executor.removeprefix("exec-")] = cfg["nodeSelector"]["labels"]["task"]
    assert seen == {task.replace("_", "-"): task for task in TASKS}


def test_fake_secret_values_in_the_environment_never_reach_the_yaml(tmp_path, monkeypatch):
    values = {
        "AWS_ACCESS_KEY_ID": "AKIA-fake-key-id-4711",
        "AWS_SECRET_ACCESS_KEY": "sekret-xyz-4711",
        "MLFLOW_TRACKING_USERNAME": "mlflow-user-4711",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-4711",
        "MLFLOW_TRACKING_TOKEN": "mlflow-token-4711",
        "PGPASSWORD": "pg-pw-4711",
        "KF_PIPELINES_TOKEN": "kf-token-4711",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    p = load_profile(CLUSTER)
    for name in available():
        text = compile_pipeline(name, p, tmp_path).read_text()
        assert "PGPASSWORD" in text and "secretAsEnv" in text  # the names are there ...
        for value in values.values():
            assert value not in text, f"{name}.yaml carries a secret value"  # ... values never


def test_a_profile_without_kubernetes_settings_compiles_without_a_platform_spec(tmp_path):
    """What `flywheel run` compiles for kfp.local is unchanged: no platforms section."""
    _spec, k8s = _docs(compile_pipeline("retrain", load_profile(None), tmp_path))
    assert (
        k8s == {}
        and "platforms" not in compile_pipeline("monitor", load_profile(None), tmp_path).read_text()
    )
