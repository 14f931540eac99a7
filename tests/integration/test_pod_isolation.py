"""The compiled DAG on Kubeflow's terms: every task in its own container of the component
image, state only in services.

This is the proof that the cluster path works, short of a cluster. `make image` builds the CPU
image here with podman (tests/fixtures_containers.py builds it once per session when it is
missing or stale), and kfp.local's DockerRunner runs every task of the compiled YAML as a
container of it, through podman's Docker API. Between the two sits a kubelet STAND-IN
(tests/kubelet_standin.py) that gives each container what the YAML's `platforms:` section gives
its pod; everything else is real:

- no checkout: flywheel is what the image installed (non-editable, /opt/flywheel), the task
  runs as the image's user (uid 1000) in the image's working directory, and no host path but
  KFP's pipeline root is mounted; the compile runs in the image too;
- no shared disk: each task is a new container, removed when it exits; the default state dir
  dies with it, so a store that is not a service is lost between tasks;
- credentials only from Secrets, per task: a container's environment is exactly the YAML's
  `env:` for its task (TMPDIR on the train task's scratch emptyDir) plus the variables its own
  `secretAsEnv` entries map, filled from a fake Secret store; the PostgreSQL password reaches
  only the plan and tune tasks, and the values never appear in the YAML;
- state passes only through KFP artifacts and real services on the host's loopback (host
  network): `mlflow server` (tracking, registry, ledger), PostgreSQL (Optuna; Debian's
  package), and an S3-compatible server (moto) holding the corpus, the window and checkpoints.

A control pipeline shows the harness bites: a task that reads a file its neighbour wrote
outside the artifacts fails, and the checkout is not there.

Runs (one module, in order): retrain #1 promotes; a monitor whose drifted window is read from
s3:// triggers a nested retrain, which warm-starts from #1 and is gated against it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from drift_corpora import license_paragraphs, pydoc_paragraphs
from fixtures_containers import (
    CHECKOUT,
    IMAGE_UID,
    IMAGE_VENV,
    ContainerLauncher,
    component_image,
    docker_api,
    run_in_image,
)
from fixtures_data import TINY_OVERRIDES
from fixtures_s3 import list_keys, make_bucket, s3_server, upload_dir
from fixtures_services import mlflow_server, postgres_server
from kubelet_standin import task_platforms

from flywheel import ledger
from flywheel.config import apply_overrides, load_profile, validate_profile
from flywheel.kfp.guard import pod_state_problems
from flywheel.registry import Registry

pytestmark = pytest.mark.integration

BUCKET = "flywheel"
# moto (without require_auth) accepts any keys; distinctive ones let the test find a leak.
S3_KEYS = {"access-key": "pod-access-key-1234", "secret-key": "pod-secret-key-5678"}
# The only tasks that get the PostgreSQL password: tune, and plan, whose preflight checks
# every service the run will use before any work starts (without it: "fe_sendauth: no
# password supplied" in the plan pod).
DB_TASKS = ["plan", "tune"]


# ----------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def image() -> str:
    return component_image()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    with postgres_server() as pg, mlflow_server(root / "mlflow") as tracking, s3_server() as s3:
        yield {"pg": pg, "tracking": tracking, "s3": s3}


@pytest.fixture(scope="module")
def host_root():
    # Short, and traversable by the image's user: the pipeline root is mounted at its own path.
    root = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def podman_socket(host_root):
    with docker_api(host_root) as sock:
        yield sock


def _jsonl(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def compile_in_image(image: str, profile_file: Path, out: Path) -> str:
    """`flywheel compile` in a container of the image, from its own working directory; the
    profile mounted read-only, the YAML written to `out`. Returns stderr."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o777)
    done = run_in_image(
        image, "flywheel", "compile", "--profile", "/in/profile.yaml", "--out", "/out",
        mounts={profile_file: "/in/profile.yaml:ro", out: "/out:rw"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.fixture(scope="module")
def world(image, services, podman_socket, host_root, tmp_path_factory):
    """The compiled pipelines for a cluster-shaped profile pointing at the loopback services,
    and a container launcher whose kubelet fills each task's Secrets."""
    root = tmp_path_factory.mktemp("world")
    s3, pg = services["s3"], services["pg"]
    make_bucket(s3, BUCKET)
    _jsonl(pydoc_paragraphs()[:700], root / "corpus" / "docs.jsonl")
    upload_dir(s3, root / "corpus", f"s3://{BUCKET}/corpus")
    _jsonl(license_paragraphs()[:200], root / "window" / "licenses.jsonl")
    upload_dir(s3, root / "window", f"s3://{BUCKET}/windows")

    overrides = [
        *TINY_OVERRIDES,
        "name=pod-test",
        f"kfp.image={image}",
        "data.source.kind=files",
        f"data.source.path=s3://{BUCKET}/corpus",
        "data.source.max_docs=500",
        "data.split.test_share=0.2",
        "train.checkpoint_every=6",
        "tune.n_trials=2",
        "tune.parallel=1",
        f"tune.storage={pg.url()}",
        f"registry.tracking_uri={services['tracking']}",
        f"storage.root=s3://{BUCKET}/runs",
        f"storage.endpoint_url={s3}",
        "drift.min_rows=40",
        "drift.cooldown_hours=0",
        # Pod isolation is tested here, not the retrain policy: a 12-step champion has
        # not learned its domain well enough to be significantly worse on licences
        # (see tests/integration/test_monitor_local.py); its bits per byte is still
        # measured, in the drift-check pod, from the held-out sample in the store.
        "drift.trigger=distribution",
        # The train pod gets a scratch emptyDir and TMPDIR on it, as on a GPU node.
        "kfp.resources.train.ephemeral_storage=2Gi",
    ]
    # One value a key: the last of the tiny defaults and this module's settings.
    data = apply_overrides({}, list({o.split("=", 1)[0]: o for o in overrides}.values()))
    data["kfp"]["kubernetes"] = {
        "secrets": [
            {"name": "flywheel-db", "env": {"password": "PGPASSWORD"}, "tasks": DB_TASKS},
            {
                "name": "flywheel-s3",
                "env": {"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"},
            },
        ]
    }
    profile_file = root / "pod.yaml"
    profile_file.write_text(yaml.safe_dump(data))
    # Fails here, not in a pod, if the shape is off; and the guard before Kubeflow must find
    # nothing that would live inside a pod (flywheel submit would refuse it otherwise).
    assert pod_state_problems(validate_profile(data, str(profile_file))) == []

    build = root / "build"
    stderr = compile_in_image(image, profile_file, build)
    assert "warning" not in stderr, f"compile warns about the pod profile: {stderr}"

    secret_store = {"flywheel-db": {"password": pg.password}, "flywheel-s3": dict(S3_KEYS)}
    launcher = ContainerLauncher(host_root / "run", podman_socket, secret_store)
    profile = load_profile(profile_file, [f"state_dir={root / 'observer'}"])
    with launcher:
        yield {
            "root": root,
            "build": build,
            "pods": launcher,
            "profile": profile,
            "secret_store": secret_store,
            "s3": s3,
            "pg": pg,
            "profile_file": profile_file,
        }


# ------------------------------------------------------------------------------ checks

PLAN_CHECKS = """
import sys
from flywheel.config import load_profile
from flywheel.train.plan import make_plan
from flywheel.tune.space import check_space

dataset = sys.argv[1]
for stage in (0, 1, 2, 3):
    p = load_profile(None, [*sys.argv[2:], f"train.zero_stage={stage}"])
    plan = make_plan(p, dataset)
    assert plan.deepspeed["zero_optimization"]["stage"] == stage, plan.deepspeed
    print("plan", stage, plan.deepspeed_config_path)
check_space(load_profile("cluster"))
print("tune space ok")
"""


def test_the_image_compiles_and_plans_from_its_own_directory(image, tmp_path):
    """What the image's install gives a pod or a platform engineer, with no checkout around:
    the packaged profiles (cluster.yaml included) and DeepSpeed configs are found, and the
    image runs as its own non-root user."""
    from fixtures_data import build_dataset

    dataset = build_dataset(tmp_path / "ds", block_size=32, vocab_size=512, max_docs=200)
    tiny = ["data.block_size=32", "model.context=32", "train.micro_batch_size=2"]
    script = (
        "set -e; id -u; flywheel compile --profile configs/cluster.yaml --out build >/dev/null; "
        'ls build; grep -c \'@sha256:\' build/retrain.yaml; python -c "$0" /data "$@"'
    )
    done = run_in_image(
        image, "sh", "-c", script, PLAN_CHECKS, *tiny, mounts={dataset: "/data:ro"}
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(IMAGE_UID)
    assert {"retrain.yaml", "monitor.yaml"} <= set(lines) and int(lines[3]) > 0
    plans = [line for line in lines if line.startswith("plan ")]
    assert len(plans) == 4 and "tune space ok" in lines
    assert all(IMAGE_VENV in line for line in plans), plans


def test_the_harness_isolates_tasks(world, image, tmp_path):
    """Control: a task reading a file its neighbour left outside the artifacts fails; the
    package is the image's, the checkout is not there, and the task runs as the image's user
    with exactly the YAML's environment and its Secrets."""
    from kfp import compiler
    from pod_control import control_pipeline

    compiled = tmp_path / "control.yaml"
    compiler.Compiler().compile(control_pipeline(image, str(CHECKOUT)), str(compiled))
    pods: ContainerLauncher = world["pods"]
    run = pods.run(compiled, {}, tmp_path / "pods.log")
    assert not run.succeeded
    assert "No such file or directory" in run.tail() and "left-behind.txt" in run.tail()
    seen = json.loads(run.output("where"))
    assert seen["package"].startswith(IMAGE_VENV + "/"), seen["package"]
    assert seen["uid"] == IMAGE_UID and not seen["checkout_visible"]
    assert seen["home"] == "/home/flywheel"
    # The control pipeline names no Secret, so its tasks get none.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"} & set(seen["env"])
    assert not {"MLFLOW_TRACKING_URI", "FLYWHEEL_STATE_DIR", "HF_HUB_OFFLINE"} & set(seen["env"])
    assert pods.kubelet.refused == [], pods.kubelet.refused
    assert len(run.pods) == 3 and {p["task"] for p in run.pods} == {
        "where",
        "write-here",
        "read-neighbour",
    }


def test_no_secret_value_is_compiled_into_the_yaml(world):
    names = {
        var
        for p in task_platforms(world["build"] / "retrain.yaml").values()
        for var in p.secret_env
    }
    assert names >= {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in ("retrain.yaml", "monitor.yaml"):
        text = (world["build"] / name).read_text()
        for secret in world["secret_store"].values():
            for value in secret.values():
                assert value not in text, f"{name} holds a secret value"


@pytest.fixture(scope="module")
def first(world):
    run = world["pods"].run(
        world["build"] / "retrain.yaml", {"trigger_reason": "first"}, world["root"] / "r1.log"
    )
    assert run.succeeded, run.tail()
    return run


def test_first_retrain_in_pods_promotes_through_the_services(world, first):
    profile = world["profile"]
    registry = Registry(profile)
    champion = registry.champion()
    assert champion is not None and champion.tags["trigger_reason"] == "first"
    run_id = champion.tags["pipeline_run_id"]
    stages = ledger.collect(profile, run_id)
    # Every stage recorded itself on the tracking server; the summary read them back.
    assert {"plan", "prepare-data", "tune", "train", "gate", "promote", "summary"} <= set(stages)
    assert stages["summary"]["tags"]["outcome"] == "succeeded"  # from the ledger, any runner
    assert stages["prepare-data"]["metrics"]["docs_kept"] > 100
    # Tuning ran on PostgreSQL; checkpoints went to object storage.
    import optuna

    summaries = optuna.get_all_study_summaries(world["pg"].url(with_password=True))
    assert any(s.n_trials >= 2 for s in summaries), summaries
    assert list_keys(world["s3"], f"s3://{BUCKET}/runs"), "no checkpoint reached object storage"
    # Every task ran in its own container with exactly its YAML env and its own Secrets.
    kubelet = world["pods"].kubelet
    assert kubelet.refused == [], kubelet.refused
    tasks = [p["task"] for p in first.pods]
    assert len(tasks) >= 8 and {"plan", "prepare-data", "tune", "train", "gate"} <= set(tasks)
    for pod in first.pods:
        assert ("PGPASSWORD" in pod["env"]) == (pod["task"] in DB_TASKS), pod
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(pod["env"]), pod
        assert pod["binds"][0].startswith(str(world["pods"].pipeline_root)), pod["binds"]
    (train,) = [p for p in first.pods if p["task"] == "train"]
    assert "TMPDIR" in train["task_env"] and train["empty_dirs"] == ["/scratch"]


def _untuned(world) -> dict:
    """The compiled profile with tuning off, as the run's `profile` parameter: run 1 already
    proved the study on PostgreSQL, and a study costs minutes on 2 cores."""
    data = yaml.safe_load(world["profile_file"].read_text())
    data["tune"]["enabled"] = False
    return validate_profile(data, "pod profile, untuned").to_param()


def test_monitor_reads_a_drifted_window_from_s3_and_its_retrain_is_gated(world, first):
    profile = world["profile"]
    before = Registry(profile).champion().version
    count = len(Registry(profile).versions())
    run = world["pods"].run(
        world["build"] / "monitor.yaml",
        {"window": f"s3://{BUCKET}/windows/licenses.jsonl", "profile": _untuned(world)},
        world["root"] / "monitor.log",
    )
    assert run.succeeded, run.tail()
    versions = Registry(profile).versions()
    assert len(versions) == count + 1, "the nested retrain registered no candidate"
    newest = versions[-1]
    assert newest.tags["trigger_reason"].startswith("drift")
    assert int(newest.version) > int(before)
    # The nested retrain is a second retrain: gated against the champion of run #1, which
    # its gate pod evaluated, and warm-started from it in the train pod.
    stages = ledger.collect(profile, newest.tags["pipeline_run_id"])
    assert "champion_perplexity" in stages["gate"]["metrics"], "the champion was not evaluated"
    assert stages["gate"]["tags"]["version"] == str(newest.version)
    import mlflow

    train_run = mlflow.MlflowClient(profile.registry.tracking_uri).get_run(
        stages["train"]["tags"]["training_run_id"]
    )
    assert train_run.data.tags["flywheel.warm_start"] == "True"
    # the data stage tokenized with the champion's tokenizer, so the warm start reads the same ids
    assert "flywheel.tokenizer_mismatch" not in train_run.data.tags
