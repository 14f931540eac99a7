"""The RayJob a Ray stage's step creates under `ray.mode: kuberay` (renders from the profile,
touches no cluster and no storage; the one thing read besides the profile is, inside a pod,
the pod's own namespace). `flywheel.runtime.kuberay` creates, watches and deletes it;
`flywheel kuberay render` prints it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from flywheel import contracts
from flywheel.config import Profile
from flywheel.errors import ConfigError

GROUP, VERSION = "ray.io", "v1"
API_VERSION = f"{GROUP}/{VERSION}"
RAYJOBS, RAYCLUSTERS = "rayjobs", "rayclusters"

# Labels on every object a step creates (the RayJob, and the RayCluster KubeRay copies them
# to): the exit handler deletes by RUN_LABEL; TASK_LABEL tells a run's steps apart.
RUN_LABEL = "flywheel/run-id"
TASK_LABEL = "flywheel/task"
MANAGED_BY = {"app.kubernetes.io/managed-by": "flywheel"}

# Set in the job's environment (runtimeEnvYAML): the stage function inside the RayJob runs
# the stage here instead of launching another RayJob.
DRIVER_ENV = "FLYWHEEL_KUBERAY_DRIVER"
ENTRY_MODULE = "flywheel.runtime.kuberay_entry"
HANDOFF_DIR = "kuberay"

# The stages that run on Ray, as the pipeline's task names (flywheel.config.TASKS).
RAY_STAGES = (contracts.PREPARE_DATA, contracts.TUNE, contracts.TRAIN)

# What a run's service account needs (deploy/kuberay-rbac.yaml grants exactly this).
REQUIRED_ACCESS: tuple[tuple[str, str, str, str], ...] = tuple(
    [(GROUP, RAYJOBS, verb, "") for verb in ("create", "get", "list", "delete", "deletecollection")]
    + [(GROUP, RAYCLUSTERS, verb, "") for verb in ("get", "list", "delete", "deletecollection")]
    + [("", "pods", "list", ""), ("", "pods", "get", "log")]
)
RBAC_FILE = "deploy/kuberay-rbac.yaml"

# KubeRay derives the cluster's name (<rayjob>-<5 chars>) and its pods' and services'
# names (<cluster>-head-svc, <cluster>-<group>-worker-<5 chars>) from the RayJob's; its
# docs advise short names so those stay within Kubernetes' 63-character limit.
MAX_NAME = 40

# The operator's own probes on a Ray container it finds without one need what the image
# lacks: before KubeRay 1.6 (and on any version for rayVersion < 2.53) they run `wget` under
# bash, which neither image has, so the head never becomes Ready. Every KubeRay since 1.3
# keeps a probe the pod template sets, so the templates set the one KubeRay 1.6+ would for
# Ray >= 2.53: an HTTP GET of the dashboard agent's unified health check (raylet, and the GCS
# on the head), which needs no tool in the image. Port: Ray's default
# --dashboard-agent-listen-port. Timings: KubeRay's defaults (ray-operator utils/constant.go).
RAY_HEALTH_PATH = "/api/healthz"
RAY_AGENT_PORT = 52365
_PROBES = {
    # probe -> (initialDelaySeconds, periodSeconds, failureThreshold)
    "readinessProbe": (10, 5, 10),
    "livenessProbe": (30, 5, 120),
}
_PROBE_TIMEOUT_S = {"ray-head": 5, "ray-worker": 2}

# Istio's per-pod switch; kubeflow/manifests' contrib/ray example turns injection off with it.
ISTIO_INJECT = "sidecar.istio.io/inject"

# RayJob cleanup by the operator (ray.kuberay.cleanup). KubeRay's validation refuses
# deletionRules beside shutdownAfterJobFinishes, and ttlSecondsAfterFinished > 0 without
# shutdownAfterJobFinishes (ray-operator/controllers/ray/utils/validation.go at v1.7.0,
# validateDeletionConfiguration): the two styles are never combined.
LEGACY_CLEANUP_FIELDS = ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished")
RULES_CLEANUP_FIELD = "deletionStrategy"


def _probes(container: str) -> dict[str, Any]:
    return {
        probe: {
            "httpGet": {"path": RAY_HEALTH_PATH, "port": RAY_AGENT_PORT},
            "initialDelaySeconds": delay,
            "periodSeconds": period,
            "timeoutSeconds": _PROBE_TIMEOUT_S[container],
            "successThreshold": 1,
            "failureThreshold": failures,
        }
        for probe, (delay, period, failures) in _PROBES.items()
    }


def cleanup(profile: Profile) -> dict[str, Any]:
    """The RayJob spec fields that have the operator delete a finished job's cluster after
    ray.kuberay.ttl_seconds_after_finished, whether it succeeded or failed, even when the
    step that created it is gone. The RayJob itself stays (the exit handler deletes it)."""
    kr = profile.ray.kuberay
    ttl = kr.ttl_seconds_after_finished
    if kr.cleanup == "legacy":
        return {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": ttl}
    # One rule per terminal state a rule can name: the Ray job's own end, and a deployment
    # that failed without one (a deadline, a submission that never happened).
    conditions = [
        {"jobStatus": "SUCCEEDED"},
        {"jobStatus": "FAILED"},
        {"jobDeploymentStatus": "Failed"},
    ]
    rules = [{"policy": "DeleteCluster", "condition": {**c, "ttlSeconds": ttl}} for c in conditions]
    return {RULES_CLEANUP_FIELD: {"deletionRules": rules}}


def _slug(text: str, limit: int) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "x"


def job_name(run_id: str, task: str) -> str:
    """`fw-<task>-<run id, shortened>-<hash>`: a DNS-1123 label, stable for a run's task (a
    retried step finds its predecessor's RayJob), distinct across runs whose ids share a
    prefix (the hash covers the whole id)."""
    digest = hashlib.sha256(f"{run_id}/{task}".encode()).hexdigest()[:6]
    head = f"fw-{_slug(task, 12)}-{_slug(run_id, 40)}"
    return f"{head[: MAX_NAME - 7].rstrip('-')}-{digest}"


def label_value(text: str) -> str:
    """A label value (<= 63 of [A-Za-z0-9-_.], alphanumeric at both ends). Run ids (UUIDs
    on Kubeflow, `dsl.PIPELINE_JOB_ID_PLACEHOLDER`) pass unchanged."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return s.strip("-_.") or "none"


def run_selector(run_id: str) -> str:
    return f"{RUN_LABEL}={label_value(run_id)}"


def labels(run_id: str, task: str) -> dict[str, str]:
    return {**MANAGED_BY, RUN_LABEL: label_value(run_id), TASK_LABEL: label_value(task)}


# Every pod's own namespace, written by Kubernetes beside its service-account token.
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Set in every pod: the same sign `api_client` takes for in-cluster config.
IN_POD_ENV = "KUBERNETES_SERVICE_HOST"
DEFAULT_NAMESPACE = "default"


def pod_namespace() -> str | None:
    """The namespace of the pod this runs in (a step, the exit handler); None elsewhere."""
    if not os.environ.get(IN_POD_ENV):
        return None
    try:
        return Path(POD_NAMESPACE_FILE).read_text().strip() or None
    except OSError:  # automountServiceAccountToken: false; the API is out of reach anyway
        return None


def namespace(profile: Profile) -> str:
    """Where the RayJobs go: ray.kuberay.namespace if set, else the run's namespace, where
    its Secrets, PVCs and service account are: in a pod the pod's own (a KFP step runs in
    the run's namespace, multi-user or not), elsewhere kfp.namespace, else 'default'."""
    return (
        profile.ray.kuberay.namespace
        or pod_namespace()
        or profile.kfp.namespace
        or DEFAULT_NAMESPACE
    )


def namespace_problem(profile: Profile) -> str | None:
    """A step whose RayJobs would go to another namespace than its own pod's, while their
    pods need the run's service account, Secrets or PVCs (which live in the pod's): one line
    naming the field, before anything is created. The profile's own two fields are compared
    at load (flywheel.config.Profile)."""
    here, there = pod_namespace(), profile.ray.kuberay.namespace
    needs = profile.kfp.kubernetes.namespaced()
    if not (here and there and here != there and needs):
        return None
    return (
        f"ray.kuberay.namespace is {there}, but this step runs in namespace {here}, where the "
        f"RayJob's pods would find the run's {'; '.join(needs)}: leave ray.kuberay.namespace "
        f"unset (the run's namespace) or set it to {here}"
    )


def _secret_env(profile: Profile, task: str) -> list[dict[str, Any]]:
    out = []
    for secret in profile.kfp.kubernetes.secrets:
        if secret.tasks and task not in secret.tasks:
            continue
        for key, var in secret.env.items():
            ref: dict[str, Any] = {"name": secret.name, "key": key}
            if secret.optional:
                ref["optional"] = True
            out.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return out


def _pod_template(
    profile: Profile,
    task: str,
    run_id: str,
    *,
    container: str,
    cpu: str,
    memory: str,
    gpus: int,
    on_task_pool: bool,
) -> dict[str, Any]:
    kr, kube = profile.ray.kuberay, profile.kfp.kubernetes
    res = profile.kfp.for_task(task)
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[res.accelerator_type or "nvidia.com/gpu"] = gpus
    env = [{"name": k, "value": v} for k, v in sorted(kr.env.items())]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": kr.shm_size}}
    ]
    for i, pvc in enumerate(p for p in kube.pvcs if not p.tasks or task in p.tasks):
        vol = f"pvc-{i}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": pvc.name}})
        mount = {"name": vol, "mountPath": pvc.mount_path}
        if pvc.sub_path:
            mount["subPath"] = pvc.sub_path
        mounts.append(mount)
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": container,
                # The step's own image: the stage code in the cluster is the code of the step.
                "image": profile.kfp.image,
                "resources": {"requests": dict(limits), "limits": dict(limits)},
                "env": env + _secret_env(profile, task),
                "volumeMounts": mounts,
                **_probes(container),
            }
        ],
        "volumes": volumes,
    }
    if container == "ray-head":
        spec["containers"][0]["ports"] = [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ]
    if kube.service_account:
        spec["serviceAccountName"] = kube.service_account
    if kube.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in kube.image_pull_secrets]
    if on_task_pool:
        if res.node_selector:
            spec["nodeSelector"] = dict(res.node_selector)
        if res.tolerations:
            spec["tolerations"] = [
                {
                    k: v
                    for k, v in {
                        "key": t.key,
                        "operator": t.operator,
                        "value": t.value,
                        "effect": t.effect,
                        "tolerationSeconds": t.toleration_seconds,
                    }.items()
                    if v is not None
                }
                for t in res.tolerations
            ]
    metadata: dict[str, Any] = {"labels": labels(run_id, task)}
    if not kr.istio_sidecar:
        metadata["annotations"] = {ISTIO_INJECT: "false"}
    return {"metadata": metadata, "spec": spec}


def entrypoint(spec_uri: str, endpoint_url: str | None = None) -> str:
    import shlex

    # The spec's store may need its endpoint before the profile (inside the spec) is read.
    extra = f" --endpoint-url {shlex.quote(endpoint_url)}" if endpoint_url else ""
    return f"python -m {ENTRY_MODULE} {shlex.quote(spec_uri)}{extra}"


def render(profile: Profile, task: str, run_id: str, spec_uri: str) -> dict[str, Any]:
    """The RayJob a step of `task` creates (pure: no cluster, no storage touched)."""
    if task not in RAY_STAGES:
        raise ConfigError(f"{task!r} is not a Ray stage; Ray stages are {', '.join(RAY_STAGES)}")
    kr = profile.ray.kuberay
    name = job_name(run_id, task)
    workers: dict[str, Any] = {
        "groupName": "workers",
        "replicas": kr.worker_replicas,
        "rayStartParams": {},
        "template": _pod_template(
            profile,
            task,
            run_id,
            container="ray-worker",
            cpu=kr.worker_cpu,
            memory=kr.worker_memory,
            gpus=kr.worker_gpu,
            on_task_pool=True,
        ),
    }
    autoscale = kr.worker_min_replicas is not None
    if autoscale:
        workers["minReplicas"] = kr.worker_min_replicas
        workers["maxReplicas"] = kr.worker_max_replicas
    else:
        workers["minReplicas"] = workers["maxReplicas"] = kr.worker_replicas
    runtime_env = {"env_vars": {DRIVER_ENV: "1"}}
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace(profile), "labels": labels(run_id, task)},
        "spec": {
            "entrypoint": entrypoint(spec_uri, profile.storage.endpoint_url),
            # The operator submits over the Jobs API under this id; the step tails it.
            "submissionMode": "HTTPMode",
            "jobId": name,
            "runtimeEnvYAML": json.dumps(runtime_env),  # JSON is YAML
            # A failed stage is the step's to retry (kfp.resources.<task>.retries), not the
            # operator's: a second RayJob attempt would hide the first one's log.
            "backoffLimit": 0,
            **cleanup(profile),
            "activeDeadlineSeconds": kr.active_deadline_seconds,
            "rayClusterSpec": {
                "rayVersion": kr.ray_version,
                "enableInTreeAutoscaling": autoscale,
                "headGroupSpec": {
                    # The head runs the driver and Ray's control plane, no stage work: the
                    # workers hold the GPUs (num-cpus 0 keeps tasks off the head).
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": _pod_template(
                        profile,
                        task,
                        run_id,
                        container="ray-head",
                        cpu=kr.head_cpu,
                        memory=kr.head_memory,
                        gpus=0,
                        on_task_pool=False,
                    ),
                },
                "workerGroupSpecs": [workers],
            },
        },
    }


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def fit_problems(profile: Profile, task: str) -> list[str]:
    """What the train stage's workers ask that the RayJob's worker pods cannot give, at
    their largest (max replicas). Ray would wait for it forever; we fail before creating."""
    if task != "train":
        return []
    kr, sc = profile.ray.kuberay, profile.train.scaling
    pods = kr.worker_max_replicas or kr.worker_replicas
    problems = []
    if sc.use_gpu:
        per_pod = int(kr.worker_gpu // sc.gpus_per_worker) if sc.gpus_per_worker else sc.num_workers
        if pods * per_pod < sc.num_workers:
            problems.append(
                f"train.scaling asks {sc.num_workers} workers x {sc.gpus_per_worker:g} GPU, but "
                f"{pods} worker pod(s) x ray.kuberay.worker_gpu {kr.worker_gpu} hold "
                f"{pods * per_pod}"
            )
    per_pod_cpu = int(_cpus(kr.worker_cpu) // sc.cpus_per_worker)
    if pods * per_pod_cpu < sc.num_workers:
        problems.append(
            f"train.scaling asks {sc.num_workers} workers x {sc.cpus_per_worker:g} CPU, but "
            f"{pods} worker pod(s) x ray.kuberay.worker_cpu {kr.worker_cpu} hold "
            f"{pods * per_pod_cpu}"
        )
    return problems


def idle_accelerators(profile: Profile) -> str | None:
    """Under ray.mode kuberay a Ray stage's step pod uploads its inputs, watches its RayJob
    over HTTP and downloads the outputs; the RayJob's worker pods hold the accelerators. One
    line naming each such step whose pod still requests some (what `flywheel compile`
    warns), or None."""
    if profile.ray.mode != "kuberay":
        return None
    asks = [
        f"kfp.resources.{task} asks {res.accelerator_count} {res.accelerator_type}"
        for task in RAY_STAGES
        if (res := profile.kfp.for_task(task)).accelerator_type and res.accelerator_count
    ]
    if not asks:
        return None
    return (
        f"ray.mode is kuberay, so the {', '.join(RAY_STAGES[:-1])} and {RAY_STAGES[-1]} step "
        "pods only talk HTTP to their "
        f"RayJobs, whose worker pods hold the accelerators (ray.kuberay.worker_gpu), yet "
        f"{'; '.join(asks)}: give those steps a small pod without accelerator_type and "
        "accelerator_count (configs/cluster.yaml shows one)"
    )


def handoff_uri(profile: Profile, run_id: str, task: str) -> str:
    """Where a step and its RayJob exchange inputs, outputs and the spec: a storage URI."""
    return f"{handoff_run_uri(profile, run_id)}/{task}"


def handoff_run_uri(profile: Profile, run_id: str) -> str:
    """The hand-off place of all of a run's steps (the exit handler removes it)."""
    from flywheel import storage

    root = profile.storage.root
    if not root or not storage.is_uri(root):
        raise ConfigError(
            "a RayJob step needs storage.root set to object storage (s3://bucket/prefix, "
            "gs://...) that the step and the RayJob's pods both reach; it is "
            + (f"{root!r}, a path on the step's own disk" if root else "unset")
        )
    loc = storage.parse(root, "storage.root")
    return loc.child(HANDOFF_DIR, label_value(run_id)).display()
