"""Per-task Kubernetes settings from the profile, written into the compiled YAML's
`platforms: kubernetes:` section through kfp-kubernetes.

What reaches a pod this way is only *names*: which Secret keys become which environment
variables, which node labels and taints, which claims. Secret values never pass through
the profile, the compiler or the YAML; the kubelet fills them in when the pod starts.
kfp.local (`flywheel run`) ignores the platform section, so a profile that sets these
still runs on this machine unchanged.
"""

from __future__ import annotations

from kfp import dsl

from flywheel.config import KfpConfig

SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
SCRATCH_VOLUME = "scratch"


def apply(task: dsl.PipelineTask, name: str, kfp: KfpConfig) -> dsl.PipelineTask:
    """Secrets, claims, pull secrets (pipeline-wide) and node placement, /dev/shm and scratch
    (per task) for one task. Order is the profile's, so the YAML is the same on every compile."""
    from kfp import kubernetes

    k8s = kfp.kubernetes
    res = kfp.for_task(name)
    for secret in k8s.secrets:
        if not secret.tasks or name in secret.tasks:
            kubernetes.use_secret_as_env(
                task,
                secret_name=secret.name,
                secret_key_to_env=dict(secret.env),
                optional=secret.optional,
            )
    for pvc in k8s.pvcs:
        if not pvc.tasks or name in pvc.tasks:
            kubernetes.mount_pvc(
                task, pvc_name=pvc.name, mount_path=pvc.mount_path, sub_path=pvc.sub_path
            )
    if k8s.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(k8s.image_pull_secrets))
    for key, value in res.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in res.tolerations:
        kubernetes.add_toleration(
            task,
            key=t.key,
            operator=t.operator,
            value=t.value,
            effect=t.effect,
            toleration_seconds=t.toleration_seconds,
        )
    if res.shm_size:
        # NCCL and torch DataLoader workers share tensors through /dev/shm; a container's
        # default 64M makes multi-GPU training fail with "unhandled system error".
        kubernetes.empty_dir_mount(
            task,
            volume_name=SHM_VOLUME,
            mount_path=SHM_PATH,
            medium="Memory",
            size_limit=res.shm_size,
        )
    if res.ephemeral_storage:
        # KFP 2.17 cannot request ephemeral-storage for a container (kubeflow/pipelines#11137).
        # The nearest it offers: an emptyDir on the node's disk with this size limit (the
        # kubelet evicts a pod that outgrows it; the scheduler does not reserve it). Not a
        # generic ephemeral volume: that claim is mounted root-owned, and the image runs as a
        # non-root user that KFP cannot give an fsGroup. TMPDIR points there, and Python's
        # tempfile, Ray's session and spill directories and Hugging Face's temporary files
        # follow TMPDIR instead of filling the container's writable layer.
        kubernetes.empty_dir_mount(
            task,
            volume_name=SCRATCH_VOLUME,
            mount_path=k8s.scratch_path,
            size_limit=res.ephemeral_storage,
        )
        task.set_env_variable("TMPDIR", k8s.scratch_path)
    return task
