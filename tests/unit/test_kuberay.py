"""`ray.mode: kuberay` without Ray: rendered RayJobs against the KubeRay CRDs' schemas, and
the step's Kubernetes side against the stand-in API server (tests/k8s_standin.py) through
the real `kubernetes` client: a failed RayJob, a deadline, a killed step cleaned up by the
exit handler's label delete, a 403 in one line, the RBAC check and `flywheel kuberay`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from k8s_standin import StandIn, crds_present, operator_refusals, schema_errors
from test_kfp_client import package  # noqa: F401  (a trivial compiled pipeline, for submit)

from flywheel.config import config_file, load_profile
from flywheel.errors import ConfigError, FlywheelError
from flywheel.runtime import kuberay, kuberay_manifest

REPO = Path(__file__).resolve().parents[2]
needs_crds = pytest.mark.skipif(
    not crds_present(), reason="../shared/contracts/kuberay-crds/ is absent"
)
RUN = "0b7e6a3c-5d1f-4a2b-9c8d-7e6f5a4b3c2d"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@pytest.fixture(autouse=True)
def _not_in_a_pod(monkeypatch):
    """Where the namespace comes from depends on running in a pod; these tests say which."""
    monkeypatch.delenv(kuberay_manifest.IN_POD_ENV, raising=False)


def cluster_profile(*extra: str):
    return load_profile(config_file("cluster.yaml"), ["ray.mode=kuberay", *extra])


def local_profile(tmp_path: Path, *extra: str):
    return load_profile(
        None,
        [
            "ray.mode=kuberay",
            "ray.kuberay.poll_s=0.1",
            f"storage.root=file://{tmp_path / 'store'}",
            f"state_dir={tmp_path / '.flywheel'}",
            *extra,
        ],
    )


# ---------------------------------------------------------------------- render


@needs_crds
@pytest.mark.parametrize("stage", kuberay.RAY_STAGES)
@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "ray.kuberay.worker_min_replicas=1",
            "ray.kuberay.worker_max_replicas=4",
            "ray.kuberay.worker_gpu=1",
            "ray.kuberay.env.NCCL_SOCKET_IFNAME=eth0",
        ],
        ["ray.kuberay.cleanup=legacy", "ray.kuberay.istio_sidecar=true"],
        ["ray.kuberay.ttl_seconds_after_finished=0"],
    ],
    ids=["fixed", "autoscaling-gpu-nccl", "legacy-cleanup-with-sidecar", "ttl-0"],
)
def test_rendered_rayjob_validates_against_the_crd(stage, extra):
    body = kuberay.render(cluster_profile(*extra), stage, RUN, "s3://b/p/spec.json")
    assert schema_errors(body) == []
    # ... and against what the operator's own validation refuses (v1.7.0, validation.go).
    assert operator_refusals(body) == []
    # The stand-in's strict schema would catch a misspelt field: prove it can fail.
    body["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(body))


def test_rendered_rayjob_carries_the_profile():
    p = cluster_profile(
        "ray.kuberay.worker_gpu=4",
        "ray.kuberay.worker_min_replicas=1",
        "ray.kuberay.worker_max_replicas=3",
        "ray.kuberay.env.NCCL_SOCKET_IFNAME=eth0",
    )
    body = kuberay.render(p, "train", RUN, "s3://b/p/spec.json")
    spec = body["spec"]
    assert spec["submissionMode"] == "HTTPMode" and spec["jobId"] == body["metadata"]["name"]
    # The run's namespace (kfp.namespace: this is not a pod), where its Secrets are.
    assert body["metadata"]["namespace"] == "team-a"
    rules = spec["deletionStrategy"]["deletionRules"]
    assert {r["policy"] for r in rules} == {"DeleteCluster"}
    assert [r["condition"] for r in rules] == [
        {"jobStatus": "SUCCEEDED", "ttlSeconds": 600},
        {"jobStatus": "FAILED", "ttlSeconds": 600},
        {"jobDeploymentStatus": "Failed", "ttlSeconds": 600},
    ]
    assert spec["activeDeadlineSeconds"] == 86400
    assert spec["entrypoint"].startswith(
        "python -m flywheel.runtime.kuberay_entry s3://b/p/spec.json"
    )
    assert "--endpoint-url http://minio.minio.svc:9000" in spec["entrypoint"]
    assert body["metadata"]["labels"][kuberay.RUN_LABEL] == RUN
    assert body["metadata"]["labels"][kuberay.TASK_LABEL] == "train"
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    (group,) = rc["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 3)
    pod = group["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == p.kfp.image  # the step's own image, by digest
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "gpu-a100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["serviceAccountName"] == "flywheel-runner"
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    # Secrets by reference, per task: flywheel-postgres is for plan and tune only.
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "flywheel-s3"
    assert "PGPASSWORD" not in env
    tuned = kuberay.render(p, "tune", RUN, "s3://b/p/spec.json")
    tune_env = tuned["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "PGPASSWORD" in {e["name"] for e in tune_env["containers"][0]["env"]}


@needs_crds
@pytest.mark.parametrize("ttl", [0, 600])
def test_deletion_rules_and_legacy_cleanup_fields_are_never_combined(ttl):
    """KubeRay refuses deletionRules beside shutdownAfterJobFinishes (and a TTL without
    it): each choice of ray.kuberay.cleanup sets one style only."""
    for choice, style, other in [
        ("rules", {kuberay_manifest.RULES_CLEANUP_FIELD}, set(kuberay_manifest.LEGACY_CLEANUP_FIELDS)),
        ("legacy", set(kuberay_manifest.LEGACY_CLEANUP_FIELDS), {kuberay_manifest.RULES_CLEANUP_FIELD}),
    ]:  # fmt: skip
        p = cluster_profile(
            f"ray.kuberay.cleanup={choice}", f"ray.kuberay.ttl_seconds_after_finished={ttl}"
        )
        for stage in kuberay.RAY_STAGES:
            spec = kuberay.render(p, stage, RUN, "s3://b/p/spec.json")["spec"]
            assert style <= spec.keys() and not other & spec.keys(), (choice, sorted(spec))
    legacy = kuberay.render(cluster_profile("ray.kuberay.cleanup=legacy"), "train", RUN, "s3://b")
    assert legacy["spec"]["shutdownAfterJobFinishes"] is True
    assert legacy["spec"]["ttlSecondsAfterFinished"] == 600
    # What the operator would say to both at once: the check above is not vacuous.
    both = kuberay.render(cluster_profile(), "train", RUN, "s3://b/p/spec.json")
    both["spec"].update(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600)
    assert schema_errors(both) == []  # the CRD's schema alone lets it through
    assert operator_refusals(both) == [
        "The RayJob spec is invalid: spec.shutdownAfterJobFinishes and "
        "spec.deletionStrategy.deletionRules are mutually exclusive"
    ]


def test_ray_pods_probe_over_http_and_keep_istio_out():
    """The operator's own probes (before KubeRay 1.6) run `wget`, which the image lacks; the
    templates set probes KubeRay keeps, which need no tool in the image. Istio's sidecar is
    off on both templates unless the profile asks for it."""
    body = kuberay.render(cluster_profile(), "train", RUN, "s3://b/p/spec.json")
    rc = body["spec"]["rayClusterSpec"]
    templates = [rc["headGroupSpec"]["template"], rc["workerGroupSpecs"][0]["template"]]
    for template in templates:
        (c,) = template["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}, c["name"]
            assert "exec" not in c[probe]
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert templates[0]["spec"]["containers"][0]["readinessProbe"]["timeoutSeconds"] == 5
    on = kuberay.render(cluster_profile("ray.kuberay.istio_sidecar=true"), "train", RUN, "s3://b")
    rc = on["spec"]["rayClusterSpec"]
    for template in (rc["headGroupSpec"]["template"], rc["workerGroupSpecs"][0]["template"]):
        assert "annotations" not in template["metadata"]


def test_rayjobs_go_to_the_runs_namespace(tmp_path, monkeypatch):
    p = load_profile(None, ["ray.mode=kuberay"])
    assert kuberay.namespace(p) == "default"  # nothing says otherwise
    p = load_profile(None, ["ray.mode=kuberay", "kfp.namespace=team-a"])
    assert kuberay.namespace(p) == "team-a"
    # In a pod (a step, the exit handler): the pod's own namespace, as Kubernetes wrote it.
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-b\n")
    monkeypatch.setattr(kuberay_manifest, "POD_NAMESPACE_FILE", str(ns_file))
    monkeypatch.setenv(kuberay_manifest.IN_POD_ENV, "10.0.0.1")
    assert kuberay.namespace(p) == "team-b"
    assert kuberay.render(p, "train", RUN, "s3://b/s.json")["metadata"]["namespace"] == "team-b"
    # Named in the profile: that, wherever the step runs.
    explicit = load_profile(None, ["ray.mode=kuberay", "ray.kuberay.namespace=ray-jobs"])
    assert kuberay.namespace(explicit) == "ray-jobs"


def test_two_namespaces_with_the_runs_secrets_are_refused_at_load(cli):
    with pytest.raises(ConfigError) as info:
        cluster_profile("ray.kuberay.namespace=ray-jobs")
    line = str(info.value)
    assert "ray.kuberay.namespace (ray-jobs) differs from kfp.namespace (team-a)" in line
    assert "service account flywheel-runner" in line and "flywheel-s3" in line
    code, out, err = cli(
        "kuberay", "render", "train", "--profile", str(config_file("cluster.yaml")),
        "ray.mode=kuberay", "ray.kuberay.namespace=ray-jobs",
    )  # fmt: skip
    assert code == 2 and out == "" and len(err) == 1 and "kfp.namespace (team-a)" in err[0]
    # The same namespace twice, a profile with nothing namespaced, or no kuberay: fine.
    cluster_profile("ray.kuberay.namespace=team-a")
    load_profile(None, ["ray.mode=kuberay", "ray.kuberay.namespace=a", "kfp.namespace=b"])
    load_profile(config_file("cluster.yaml"), ["ray.kuberay.namespace=ray-jobs"])


def test_a_step_whose_rayjobs_would_leave_its_namespace_fails_before_creating(
    tmp_path, monkeypatch
):
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-a")
    monkeypatch.setattr(kuberay_manifest, "POD_NAMESPACE_FILE", str(ns_file))
    monkeypatch.setenv(kuberay_manifest.IN_POD_ENV, "10.0.0.1")
    p = local_profile(
        tmp_path, "ray.kuberay.namespace=ray-jobs", "kfp.kubernetes.service_account=runner"
    )
    with pytest.raises(ConfigError) as info:
        kuberay.run(p, "train", RUN, {}, cluster=object())  # type: ignore[arg-type]
    assert str(info.value) == (
        "ray.kuberay.namespace is ray-jobs, but this step runs in namespace team-a, where the "
        "RayJob's pods would find the run's service account runner: leave "
        "ray.kuberay.namespace unset (the run's namespace) or set it to team-a"
    )
    assert not (tmp_path / "store").exists(), "nothing written, nothing created"


@pytest.mark.parametrize(
    "run_id", [RUN, "cli-20261128-120000-abc123", "My_Run.ID/with spaces" * 5, "x"]
)
def test_names_are_kubernetes_names_and_differ_per_run_and_task(run_id):
    names = {kuberay.job_name(run_id, t) for t in kuberay.RAY_STAGES}
    assert len(names) == 3
    for name in names:
        assert DNS_LABEL.fullmatch(name) and len(name) <= kuberay.MAX_NAME, name
    assert kuberay.job_name(run_id, "train") == kuberay.job_name(run_id, "train")
    # Run ids sharing their first 40 characters still get distinct names.
    assert kuberay.job_name(run_id + "a" * 50, "train") != kuberay.job_name(
        run_id + "b" * 50, "train"
    )
    assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", kuberay.label_value(run_id))


def test_a_path_as_storage_root_is_refused_before_anything_is_created(tmp_path):
    p = load_profile(None, ["ray.mode=kuberay", f"storage.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"storage\.root .*a path on the step's own disk"):
        kuberay.handoff_uri(p, RUN, "train")


def test_train_that_cannot_fit_the_worker_pods_fails_before_creating(tmp_path):
    p = local_profile(tmp_path, "train.scaling.use_gpu=true", "train.scaling.num_workers=4")
    with pytest.raises(
        ConfigError, match=r"4 workers x 1 GPU, but 2 worker pod\(s\) x ray.kuberay.worker_gpu 0"
    ):
        kuberay.run(p, "train", RUN, {}, cluster=object())  # type: ignore[arg-type]


def test_launch_only_in_kuberay_mode_and_never_inside_the_rayjob(monkeypatch):
    assert kuberay.launches({"ray": {"mode": "kuberay"}})
    assert not kuberay.launches({"ray": {"mode": "local"}}) and not kuberay.launches({})
    monkeypatch.setenv(kuberay.DRIVER_ENV, "1")
    assert not kuberay.launches({"ray": {"mode": "kuberay"}})


# ---------------------------------------------------------------------- the stand-in


@pytest.fixture
def standin(tmp_path, monkeypatch):
    with StandIn(behaviour="pending") as s:
        monkeypatch.setenv("KUBECONFIG", str(s.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield s


needs_standin = pytest.mark.skipif(
    not crds_present(), reason="the stand-in validates with the CRDs"
)


@needs_standin
def test_a_rayjob_failed_by_the_operator_fails_the_step_in_one_line_and_is_deleted(
    standin, tmp_path
):
    p = local_profile(tmp_path)
    name = kuberay.job_name(RUN, "train")

    def fail_soon(_s: float) -> None:
        time.sleep(0.05)
        if standin.get("rayjobs", name) and not standin.requests[-1][1].endswith("/status"):
            standin.fail(name, "RayClusterFailed", "head pod ImagePullBackOff:\nimage not found")

    cluster = kuberay.Cluster("default")
    cluster.create(kuberay.render(p, "train", RUN, "file:///x/spec.json"))
    with pytest.raises(FlywheelError) as info:
        kuberay.watch(cluster, name, poll_s=0, timeout_s=30, sleep=fail_soon)
    assert str(info.value) == (
        f"RayJob {name} Failed (RayClusterFailed): head pod ImagePullBackOff: image not found"
    )

    # Through run(): the same failure, and the finally deletes the RayJob and its cluster.
    standin.objects.clear()
    import threading

    def fail_when_created() -> None:
        for _ in range(200):
            if standin.get("rayjobs", name):
                standin.fail(name, "RayClusterFailed", "head pod ImagePullBackOff")
                return
            time.sleep(0.02)

    threading.Thread(target=fail_when_created, daemon=True).start()
    with pytest.raises(FlywheelError, match=f"RayJob {name} Failed"):
        kuberay.run(p, "train", RUN, {"stage": "train"})
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []


@needs_standin
def test_a_cluster_never_ready_fails_within_resource_wait_and_is_deleted(standin, tmp_path):
    # The stand-in's "pending" cluster never comes up (no node fits). Without the wait the
    # step would sit until the RayJob's deadline (here 20 s, on a cluster a day).
    p = local_profile(tmp_path, "ray.resource_wait_s=0.5", "ray.kuberay.active_deadline_seconds=20")
    t0 = time.monotonic()
    with pytest.raises(FlywheelError) as info:
        kuberay.run(p, "train", RUN, {"stage": "train"})
    name = kuberay.job_name(RUN, "train")
    assert str(info.value) == (
        f"RayJob {name}: its Ray cluster was not ready within 0.5 s (ray.resource_wait_s), "
        "still Initializing: RayClusterProvisioned False (RayClusterPodsProvisioning): "
        "RayCluster Pods are being provisioned for first time; workers ready 0/2"
    )
    assert time.monotonic() - t0 < 10
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []


class _Fixed:
    """A RayJob that reads the same at every look: enough for `watch` without an API."""

    namespace = "default"

    def __init__(self, obj):
        self.obj = obj

    def get(self, name):
        return self.obj


def test_a_rayjob_the_operator_never_touches_fails_within_resource_wait():
    ticks = iter(range(100))
    with pytest.raises(FlywheelError) as info:
        kuberay.watch(
            _Fixed({"metadata": {}}), "fw-x", poll_s=1, timeout_s=1000, ready_s=3,
            clock=lambda: float(next(ticks)), sleep=lambda s: None,
        )  # fmt: skip
    assert str(info.value) == (
        "RayJob fw-x has no status after 3 s (ray.resource_wait_s): is the KubeRay operator "
        "running and watching namespace default?"
    )


# What a driver's log ends with when a Ray task raised (captured from Ray 2.60: the task name
# coloured, the cause's frames and line after RayTaskError's own).
RAY_TASK_TRACEBACK = """\
2026-12-07 23:29:45,564\tINFO worker.py:2038 -- Started a local Ray instance.
Traceback (most recent call last):
  File "/opt/flywheel/lib/python3.11/site-packages/flywheel/runtime/kuberay_entry.py", line 9, in main
    execute(spec, ns.endpoint_url, Path(tmp))
  File "/opt/flywheel/lib/python3.11/site-packages/ray/_private/worker.py", line 1053, in get_objects
    raise value.as_instanceof_cause()
ray.exceptions.RayTaskError(ArrowInvalid): \x1b[36mray::ReadParquet()\x1b[39m (pid=14673, ip=10.0.0.5)
  File "/opt/flywheel/lib/python3.11/site-packages/pyarrow/parquet/core.py", line 6, in read
pyarrow.lib.ArrowInvalid: Parquet magic bytes not found in footer
"""


@pytest.mark.parametrize(
    "log, line",
    [
        (RAY_TASK_TRACEBACK, "pyarrow.lib.ArrowInvalid: Parquet magic bytes not found in footer"),
        # The entrypoint's own one line, after an earlier, handled traceback.
        (
            "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'a'\n"
            "flywheel: stage train of run r in this RayJob\nFlywheelError: no manifest in /data\n",
            "FlywheelError: no manifest in /data",
        ),
        # What a worker printed, behind Ray's prefix; a bare class; Ray's log lines after it.
        (
            "(RayTrainWorker pid=12, ip=10.0.0.7) torch.OutOfMemoryError: CUDA out of memory\n"
            "2026-12-07 12:00:00,000\tINFO worker.py:1 -- shutting down\n",
            "torch.OutOfMemoryError: CUDA out of memory",
        ),
        ('Traceback (most recent call last):\n  File "x.py"\nAssertionError\n', "AssertionError"),
        ("flywheel: stage train of run r in this RayJob\nKilled\n", ""),
    ],
    ids=["ray-task-cause", "entrypoint-line", "worker-prefix", "bare", "none"],
)
def test_the_driver_logs_last_exception_line_is_the_error(log, line):
    tail = kuberay.LogTail("fw-x", lambda _: None)
    tail.text = log
    assert tail.last_error() == line


def _failed(**status):
    return {"status": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", **status}}


@pytest.fixture
def dead_port() -> int:
    """A port nothing listens on: a Ray head that is gone."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_job_without_a_readable_log_still_says_rays_error(dead_port):
    # The head is gone (its cluster deleted): Ray's own message, which quotes the log's tail,
    # gives the exception line, not 20,000 characters of log on one line.
    ray_message = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated to "
        "20,000 chars):\n" + RAY_TASK_TRACEBACK * 40
    )
    obj = _failed(reason="AppFailed", message=ray_message, dashboardURL=f"127.0.0.1:{dead_port}")
    with pytest.raises(FlywheelError) as info:
        kuberay.watch(_Fixed(obj), "fw-x", poll_s=0, timeout_s=10)
    assert str(info.value) == (
        "RayJob fw-x Failed, job FAILED (AppFailed): "
        "pyarrow.lib.ArrowInvalid: Parquet magic bytes not found in footer"
    )
    # Neither a log nor a message: the line says why no error could be read.
    obj = _failed(reason="AppFailed", dashboardURL=f"127.0.0.1:{dead_port}")
    with pytest.raises(FlywheelError) as info:
        kuberay.watch(_Fixed(obj), "fw-x", poll_s=0, timeout_s=10)
    line = str(info.value)
    assert line.startswith(
        "RayJob fw-x Failed, job FAILED (AppFailed): the driver's log could not be read "
        f"(http://127.0.0.1:{dead_port}: "
    ), line
    assert "\n" not in line and len(line) < 800


@needs_standin
def test_a_deadline_fails_the_step_and_leaves_nothing(standin, tmp_path):
    p = local_profile(tmp_path, "ray.kuberay.active_deadline_seconds=1")
    t0 = time.monotonic()
    with pytest.raises(FlywheelError) as info:
        kuberay.run(p, "train", RUN, {"stage": "train"})
    name = kuberay.job_name(RUN, "train")
    assert str(info.value).startswith(
        f"RayJob {name} passed its deadline (ray.kuberay.active_deadline_seconds): "
        "The RayJob has passed the activeDeadlineSeconds."
    ), info.value
    assert time.monotonic() - t0 < 10
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []
    # The spec went to storage, under the run and the task.
    assert (tmp_path / "store" / "kuberay" / RUN / "train" / "spec.json").is_file()


def _start_step(tmp_path: Path) -> subprocess.Popen:
    """A step process running kuberay.run against the stand-in (a RayJob that never starts)."""
    overrides = [
        "ray.mode=kuberay",
        "ray.kuberay.poll_s=0.1",
        f"storage.root=file://{tmp_path / 'store'}",
        f"state_dir={tmp_path / '.flywheel'}",
    ]
    code = textwrap.dedent(f"""
        from flywheel.config import load_profile
        from flywheel.runtime import kuberay
        p = load_profile(None, {overrides!r})
        kuberay.run(p, "train", {RUN!r}, {{"stage": "train"}})
    """)
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def _wait_created(standin: StandIn, step: subprocess.Popen, name: str) -> None:
    for _ in range(300):
        if standin.get("rayjobs", name) or step.poll() is not None:
            break
        time.sleep(0.05)
    assert standin.get("rayjobs", name), step.stderr.read() if step.poll() is not None else ""  # type: ignore[union-attr]


@needs_standin
def test_a_step_stopped_by_sigterm_deletes_its_rayjob_itself(standin, tmp_path):
    step = _start_step(tmp_path)
    name = kuberay.job_name(RUN, "train")
    try:
        _wait_created(standin, step, name)
        step.terminate()  # SIGTERM: what Kubernetes sends a pod it stops
        _, err = step.communicate(timeout=30)
    finally:
        if step.poll() is None:
            step.kill()
    assert step.returncode == 128 + signal.SIGTERM, err
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []


@needs_standin
def test_a_killed_step_leaves_its_rayjob_and_the_exit_handler_deletes_it(standin, tmp_path):
    p = local_profile(tmp_path)
    # Another run's RayJob in the same namespace must survive this run's cleanup.
    other = kuberay.render(p, "train", "another-run", "file:///x/spec.json")
    kuberay.Cluster("default").create(other)
    step = _start_step(tmp_path)
    name = kuberay.job_name(RUN, "train")
    try:
        _wait_created(standin, step, name)
        step.kill()  # SIGKILL: no finally runs, as when the node dies or the grace period ends
        step.wait(timeout=10)
    finally:
        if step.poll() is None:
            step.kill()
    assert name in standin.names("rayjobs"), "a killed step cannot clean up after itself"
    assert len(standin.names("rayclusters", kuberay.run_selector(RUN))) == 1

    handoff = tmp_path / "store" / kuberay_manifest.HANDOFF_DIR / RUN
    assert (handoff / "train" / "spec.json").is_file()

    gone = kuberay.cleanup_run(p, RUN)  # what the retrain pipeline's exit handler calls

    assert gone == [f"rayjob/{name}", f"handoff {kuberay.handoff_run_uri(p, RUN)}"]
    assert not handoff.exists() and (tmp_path / "store" / kuberay_manifest.HANDOFF_DIR).is_dir()
    assert standin.names("rayjobs", kuberay.run_selector(RUN)) == []
    assert standin.names("rayclusters", kuberay.run_selector(RUN)) == []
    assert standin.names("rayjobs") == [other["metadata"]["name"]]
    assert kuberay.cleanup_run(p, RUN) == []  # a second call finds nothing
    # Outside kuberay mode the exit handler does not touch the API at all.
    before = len(standin.requests)
    assert kuberay.cleanup_run(load_profile(None, []), RUN) == []
    assert len(standin.requests) == before


@needs_standin
def test_a_step_stopped_while_its_create_is_in_flight_deletes_the_rayjob(standin, tmp_path):
    """The API server stored the RayJob but the step never read the answer (SIGTERM
    mid-request, the race CI once hit in the test above): the step deletes it by name."""

    class StoppedMidCreate(kuberay.Cluster):
        def create(self, body, *, replace=False):
            super().create(body, replace=replace)
            raise SystemExit(128 + signal.SIGTERM)  # before create's answer reached the step

    cluster = StoppedMidCreate("default")
    with pytest.raises(SystemExit):
        kuberay.run(local_profile(tmp_path), "train", RUN, {"stage": "train"}, cluster=cluster)
    assert standin.names("rayjobs") == []
    assert ("DELETE", f"rayjobs/{kuberay.job_name(RUN, 'train')}") in [
        (verb, "/".join(path.rstrip("/").split("/")[-2:])) for verb, path in standin.requests
    ]


@needs_standin
def test_creation_refused_by_rbac_is_one_clear_line(standin, tmp_path):
    standin.forbidden.add(("create", "rayjobs"))
    p = local_profile(tmp_path)
    with pytest.raises(FlywheelError) as info:
        kuberay.Cluster("default").create(kuberay.render(p, "train", RUN, "file:///x/spec.json"))
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(
        f"cannot create RayJob {kuberay.job_name(RUN, 'train')} in namespace default: forbidden: "
    )
    assert 'cannot create resource "rayjobs" in API group "ray.io"' in line
    assert line.endswith(
        f"grant the run's service account the Role in {kuberay.RBAC_FILE} "
        "(`flywheel kuberay check` lists what is missing)"
    )
    assert standin.names("rayjobs") == []


@needs_standin
@pytest.mark.parametrize(
    "forbidden",
    [[("create", "rayjobs")], [("get", "rayjobs"), ("delete", "rayjobs")], [("list", "pods")]],
    ids=["create", "watch-and-delete", "pods"],
)
def test_a_step_without_the_rbac_names_what_is_missing_and_creates_nothing(
    standin, tmp_path, forbidden
):
    """A step that may create but not read or delete would leave a RayJob it can neither
    watch nor remove: the step asks first (SelfSubjectAccessReview) and creates nothing."""
    standin.forbidden.update(forbidden)
    with pytest.raises(FlywheelError) as info:
        # (A bounded deadline: a step that did create would otherwise wait for the pending
        # cluster a day.)
        p = local_profile(tmp_path, "ray.kuberay.active_deadline_seconds=5")
        kuberay.run(p, "train", RUN, {"stage": "train"})
    missing = ", ".join(
        f"{verb} {res}{'.ray.io' if 'ray' in res else ''}" for verb, res in forbidden
    )
    assert str(info.value) == (
        f"in namespace default this step may not: {missing}; grant the run's service account "
        f"the Role in {kuberay.RBAC_FILE} (nothing was created)"
    )
    assert not [r for r in standin.requests if r[0] == "POST" and r[1].endswith("/rayjobs")]
    assert standin.names("rayjobs") == []


@needs_standin
def test_kuberay_check_lists_what_rbac_is_missing(standin, cli):
    code, out, err = cli("kuberay", "check", "ray.mode=kuberay")
    assert code == 0 and "ok:" in out and err == []
    standin.forbidden |= {("deletecollection", "rayjobs"), ("get", "pods/log")}
    code, out, err = cli("kuberay", "check", "ray.mode=kuberay")
    assert code == 1 and len(err) == 1
    assert "may not: deletecollection rayjobs.ray.io, get pods/log;" in err[0]
    assert kuberay.RBAC_FILE in err[0]


def test_the_shipped_rbac_grants_what_the_step_needs():
    docs = list(yaml.safe_load_all((REPO / kuberay.RBAC_FILE).read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource, verb, sub in kuberay.REQUIRED_ACCESS:
        assert (group, f"{resource}/{sub}" if sub else resource, verb) in granted
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # The binding's subject is the account the cluster profile's pods run as.
    assert binding["subjects"][0]["name"] == cluster_profile().kfp.kubernetes.service_account


# ---------------------------------------------------------------------- the CLI


@needs_crds
def test_render_prints_the_rayjob_as_yaml(cli):
    code, out, err = cli(
        "kuberay", "render", "train", "--profile", str(config_file("cluster.yaml")),
        "--run-id", RUN, "ray.mode=kuberay",
    )  # fmt: skip
    assert code == 0 and err == []
    body = yaml.safe_load(out)
    assert body["kind"] == "RayJob" and body["metadata"]["name"] == kuberay.job_name(RUN, "train")
    assert schema_errors(body) == []
    assert body["spec"]["entrypoint"].split()[3] == (
        f"s3://flywheel-runs/flywheel/kuberay/{RUN}/train/spec.json"
    )


def test_compile_warns_when_a_ray_step_pod_under_kuberay_asks_for_gpus(cli, tmp_path):
    profile = ["--profile", str(config_file("cluster.yaml")), "ray.mode=kuberay"]
    code, _, err = cli("compile", *profile, "--out", str(tmp_path / "a"))
    assert code == 0 and (tmp_path / "a" / "retrain.yaml").is_file()
    assert err == [
        "warning: ray.mode is kuberay, so the prepare-data, tune and train step pods only "
        "talk HTTP to their RayJobs, whose worker pods hold the accelerators "
        "(ray.kuberay.worker_gpu), yet kfp.resources.tune asks 4 nvidia.com/gpu; "
        "kfp.resources.train asks 4 nvidia.com/gpu: give those steps a small pod without "
        "accelerator_type and accelerator_count (configs/cluster.yaml shows one)"
    ]
    # The small pods configs/cluster.yaml suggests for kuberay: no warning.
    small = [
        'kfp.resources.prepare-data={cpu: "1", memory: 4Gi, ephemeral_storage: 50Gi}',
        'kfp.resources.tune={cpu: "1", memory: 4Gi}',
        'kfp.resources.train={cpu: "1", memory: 4Gi, ephemeral_storage: 50Gi, retries: 2}',
    ]
    code, _, err = cli("compile", *profile, *small, "--out", str(tmp_path / "b"))
    assert code == 0 and err == []
    # GPUs on a step pod are right where Ray runs in it (ray.mode local).
    code, _, err = cli("compile", profile[0], profile[1], "--out", str(tmp_path / "c"))
    assert code == 0 and err == []


def test_render_refuses_a_stage_that_is_not_on_ray(cli):
    code, out, err = cli("kuberay", "render", "evaluate")
    assert code == 2 and out == "" and len(err) == 1
    assert "'evaluate' is not a Ray stage" in err[0]


@needs_standin
def test_the_exit_handlers_block_cleans_up_even_when_the_summary_fails(standin, tmp_path):
    p = local_profile(tmp_path)
    kuberay.Cluster("default").create(kuberay.render(p, "train", RUN, "file:///x/spec.json"))
    # components/summary.py wraps the summary in this block, with the profile parameter.
    with (
        pytest.raises(RuntimeError, match="summary broke"),
        kuberay.cleanup_after(p.to_param(), RUN),
    ):
        raise RuntimeError("summary broke")
    assert standin.names("rayjobs") == [] and standin.names("rayclusters") == []


# ---------------------------------------------------------------------- multi-node resume


def test_a_resume_with_another_worker_count_fails_before_training(tmp_path):
    import json

    from flywheel.train.run import STATE_FILE, check_resume_world_size

    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 6, "world_size": 4}))
    check_resume_world_size(ckpt, 4)  # the same count resumes
    with pytest.raises(ConfigError) as info:
        check_resume_world_size(ckpt, 8)
    assert str(info.value) == (
        f"train.resume_from: {ckpt} was written by 4 workers and this run has 8 "
        "(train.scaling.num_workers); resume with 4 workers, or convert it to a DeepSpeed "
        "universal checkpoint and start from its weights"
    )
    # A checkpoint from before the count was recorded is left to DeepSpeed.
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 6}))
    check_resume_world_size(ckpt, 8)


def test_a_stage_run_outside_a_rayjob_in_kuberay_mode_says_where_it_runs(monkeypatch):
    from flywheel.config import RayConfig
    from flywheel.runtime import ensure_ray

    monkeypatch.delenv(kuberay.DRIVER_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"^ray.mode is 'kuberay': the prepare-data, tune and"):
        ensure_ray(RayConfig(mode="kuberay"))


# ---------------------------------------------------------------------- submit


@pytest.fixture
def kfp_submit(contracts_dir, state_dir, package, monkeypatch):  # noqa: F811
    """`flywheel submit retrain` of a trivial package (test_kfp_client's) against the KFP
    API stand-in, with a kuberay profile: the stand-in and the argument list."""
    from standin_kfp import KfpStandIn

    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with KfpStandIn(contracts_dir, token="tok") as server:
        yield server, [
            "submit", "retrain", "ray.mode=kuberay",
            "registry.tracking_uri=http://mlflow.example:5000",
            "tune.storage=postgresql+psycopg2://optuna@pg.example:5432/optuna",
            "storage.root=s3://bucket/flywheel",
            "--host", server.url, "--package", str(package),
        ]  # fmt: skip


@needs_standin
def test_submit_warns_in_one_line_what_rbac_is_missing_and_submits(
    kfp_submit, standin, cli, monkeypatch
):
    kfp, args = kfp_submit
    standin.forbidden |= {("create", "rayjobs"), ("get", "pods/log")}
    code, _, err = cli(*args)
    assert code == 0 and len(kfp.runs) == 1, err
    warnings = [line for line in err if line.startswith("warning:")]
    assert warnings == [
        "warning: in namespace default this identity may not: create rayjobs.ray.io, get "
        "pods/log; the run's service account needs them to run its RayJobs (apply "
        f"{kuberay.RBAC_FILE})"
    ]
    # Everything allowed: no warning at all.
    standin.forbidden.clear()
    code, _, err = cli(*args)
    assert code == 0 and len(kfp.runs) == 2
    assert not [line for line in err if "warning" in line or "RBAC" in line], err


@needs_standin
def test_schedule_create_warns_what_rbac_is_missing_too(kfp_submit, standin, cli):
    kfp, args = kfp_submit
    schedule = ["schedule", "create", *args[1:], "--cron", "0 3 * * *"]
    standin.forbidden |= {("list", "rayjobs")}
    code, _, err = cli(*schedule)
    assert code == 0 and len(kfp.recurring) == 1, err
    assert [line for line in err if line.startswith("warning:")] == [
        "warning: in namespace default this identity may not: list rayjobs.ray.io; the run's "
        f"service account needs them to run its RayJobs (apply {kuberay.RBAC_FILE})"
    ]


def test_components_run_the_library_stage_or_its_rayjob(monkeypatch):
    from flywheel import stages
    from flywheel.contracts import PREPARE_DATA, TRAIN, TUNE
    from flywheel.runtime import kuberay_entry

    here = {"ray": {"mode": "local"}}
    there = {"ray": {"mode": "kuberay"}}
    assert kuberay_entry.runner(PREPARE_DATA, here) is stages.prepare
    assert kuberay_entry.runner(TUNE, here) is stages.tune
    assert kuberay_entry.runner(TRAIN, here) is stages.train
    assert kuberay_entry.runner(PREPARE_DATA, there) is kuberay_entry.prepare
    assert kuberay_entry.runner(TUNE, there) is kuberay_entry.tune
    assert kuberay_entry.runner(TRAIN, there) is kuberay_entry.train
    # Inside the RayJob the stage runs here: a job never launches another.
    monkeypatch.setenv(kuberay.DRIVER_ENV, "1")
    assert kuberay_entry.runner(TRAIN, there) is stages.train


def test_submit_says_in_one_line_when_the_kubernetes_api_is_not_reachable(
    kfp_submit, cli, tmp_path, monkeypatch
):
    import socket

    kfp, args = kfp_submit
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    (tmp_path / "kubeconfig").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{dead}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    t0 = time.monotonic()
    code, _, err = cli(*args)
    assert code == 0 and len(kfp.runs) == 1, err
    (line,) = [line for line in err if "RBAC" in line]
    assert line.startswith(
        f"warning: RayJob RBAC not checked: the Kubernetes API at http://127.0.0.1:{dead} is "
        "not reachable from here ("
    )
    assert line.endswith("run `flywheel kuberay check` where it is")
    assert time.monotonic() - t0 < 60
    # No kubeconfig at all: said as plainly, and the run is still submitted.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    code, _, err = cli(*args)
    assert code == 0 and len(kfp.runs) == 2
    (line,) = [line for line in err if "RBAC" in line]
    assert line.startswith("warning: RayJob RBAC not checked: no Kubernetes API to talk to: ")


def test_submit_of_a_profile_without_kuberay_asks_no_kubernetes_api(kfp_submit, cli, monkeypatch):
    kfp, args = kfp_submit
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    code, _, err = cli(*[a if a != "ray.mode=kuberay" else "ray.mode=local" for a in args])
    assert code == 0 and len(kfp.runs) == 1
    assert not [line for line in err if "RBAC" in line], err
