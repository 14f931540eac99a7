"""The compiled DAG on Kubeflow's terms: every task in its own pod, state only in services.

This is the proof that the cluster path works, short of a cluster. What each isolation is
and how it is enforced (see tests/fixtures_pod.py for the mechanics):

- no checkout: flywheel is built into a wheel and installed non-editable into a fresh venv
  outside the repository (the image's install path); tasks and the driver run that venv's
  python from empty directories, so `import flywheel` finds site-packages, and a path
  computed from the package (`configs/`, the repo root) points into site-packages;
- no shared disk: every task runs in a new empty working directory, HOME, TMPDIR and
  RAY_TMPDIR, deleted when the task exits; the default state dir (`.flywheel` in the working
  directory) dies with its pod, so a store that is not a service is lost between tasks;
- credentials only from Secrets: each task's environment is rebuilt from nothing; it holds
  the image's variables and exactly the variables the compiled YAML's `platforms:` section
  maps from Kubernetes Secrets, filled from a fake Secret store (the values never appear in
  the YAML);
- state passes only through KFP artifacts and real services on loopback: `mlflow server`
  (tracking, registry, ledger), PostgreSQL (Optuna; Debian's package), and an S3-compatible
  server (moto) holding the corpus, the production window and Ray checkpoints.

A control pipeline shows the harness bites: a task that reads a file its neighbour wrote
outside the artifacts fails here and passes under plain kfp.local.

Runs (one module, in order): retrain #1 promotes; a monitor whose drifted window is read
from s3:// triggers a nested retrain, which warm-starts from #1 and is gated against it (the
second retrain: a separate one would check the same things for two more minutes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from drift_corpora import license_paragraphs, pydoc_paragraphs
from fixtures_data import TINY_OVERRIDES
from fixtures_pod import (
    CHECKOUT,
    IMAGE_ENV,
    PodLauncher,
    build_wheel,
    image_python,
    secret_env_names,
)
from fixtures_s3 import list_keys, make_bucket, s3_server, upload_dir
from fixtures_services import mlflow_server, postgres_server

from flywheel import ledger
from flywheel.config import apply_overrides, load_profile, validate_profile
from flywheel.kfp.guard import pod_state_problems
from flywheel.registry import Registry

pytestmark = pytest.mark.integration

BUCKET = "flywheel"
# moto (without require_auth) accepts any keys; distinctive ones let the test find a leak.
S3_KEYS = {"access-key": "pod-access-key-1234", "secret-key": "pod-secret-key-5678"}


# ----------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    return image_python(root / "venv", build_wheel(root / "wheel"))


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    with postgres_server() as pg, mlflow_server(root / "mlflow") as tracking, s3_server() as s3:
        yield {"pg": pg, "tracking": tracking, "s3": s3}


@pytest.fixture(scope="module")
def launcher():
    # Short root: Ray's socket paths under RAY_TMPDIR must stay below 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="fp", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _jsonl(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def world(image, services, launcher, tmp_path_factory):
    """The compiled pipelines for a cluster-shaped profile pointing at the loopback services,
    and a pod launcher whose environment is what the YAML's Secrets give a pod."""
    root = tmp_path_factory.mktemp("world")
    s3, pg = services["s3"], services["pg"]
    make_bucket(s3, BUCKET)
    _jsonl(pydoc_paragraphs()[:700], root / "corpus" / "docs.jsonl")
    upload_dir(s3, root / "corpus", f"s3://{BUCKET}/corpus")
    _jsonl(license_paragraphs()[:200], root / "window" / "licenses.jsonl")
    upload_dir(s3, root / "window", f"s3://{BUCKET}/windows")

    data = apply_overrides(
        {},
        [
            *TINY_OVERRIDES,
            "name=pod-test",
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
        ],
    )
    data["kfp"] = {
        "kubernetes": {
            "secrets": [
                {"name": "flywheel-db", "env": {"password": "PGPASSWORD"}},
                {
                    "name": "flywheel-s3",
                    "env": {
                        "access-key": "AWS_ACCESS_KEY_ID",
                        "secret-key": "AWS_SECRET_ACCESS_KEY",
                    },
                },
            ]
        }
    }
    profile_file = root / "pod.yaml"
    profile_file.write_text(yaml.safe_dump(data))
    # Fails here, not in a pod, if the shape is off; and the guard before Kubeflow must find
    # nothing that would live inside a pod (flywheel submit would refuse it otherwise).
    assert pod_state_problems(validate_profile(data, str(profile_file))) == []

    # Compile in the image, from an empty directory, as a platform engineer would.
    build = root / "build"
    empty = root / "compile-cwd"
    empty.mkdir()
    out = subprocess.run(
        [str(image.parent / "flywheel"), "compile", "--profile", str(profile_file), "--out", str(build)],
        cwd=empty, capture_output=True, text=True, timeout=300,
        env={**IMAGE_ENV, "PATH": f"{image.parent}:/usr/bin:/bin", "HOME": str(empty)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr, f"compile warns about the pod profile: {out.stderr}"

    secret_store = {"flywheel-db": {"password": pg.password}, "flywheel-s3": dict(S3_KEYS)}
    secret_vars = secret_env_names(build / "retrain.yaml")
    env = {var: secret_store[name][key] for var, (name, key) in secret_vars.items()}
    pods = PodLauncher(launcher, image, env)
    profile = load_profile(profile_file, [f"state_dir={root / 'observer'}"])
    return {
        "root": root,
        "build": build,
        "pods": pods,
        "profile": profile,
        "secret_vars": secret_vars,
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


def test_the_installed_package_compiles_and_plans_from_any_directory(image, tmp_path):
    """What the image's install gives a pod or a platform engineer, with no checkout around:
    the packaged profiles (cluster.yaml included) and DeepSpeed configs are found."""
    from fixtures_data import build_dataset

    dataset = build_dataset(tmp_path / "ds", block_size=32, vocab_size=512, max_docs=200)
    empty = tmp_path / "anywhere"
    empty.mkdir()
    env = {**IMAGE_ENV, "PATH": f"{image.parent}:/usr/bin:/bin", "HOME": str(empty)}
    compiled = subprocess.run(
        [str(image.parent / "flywheel"), "compile", "--profile", "configs/cluster.yaml",
         "--out", "build"],
        cwd=empty, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    assert {p.name for p in (empty / "build").glob("*.yaml")} == {"retrain.yaml", "monitor.yaml"}
    text = (empty / "build" / "retrain.yaml").read_text()
    assert "platforms:" in text and "@sha256:" in text
    tiny = ["data.block_size=32", "model.context=32", "train.micro_batch_size=2"]
    planned = subprocess.run(
        [str(image), "-c", PLAN_CHECKS, str(dataset), *tiny],
        cwd=empty, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert planned.stdout.count("plan ") == 4 and "tune space ok" in planned.stdout
    site = image.parents[1]
    assert all(str(site) in line for line in planned.stdout.splitlines() if line.startswith("plan"))


def test_the_harness_isolates_tasks(world, tmp_path):
    """Control: a task reading a file its neighbour left outside the artifacts fails in pods
    and succeeds under plain kfp.local; the package comes from the wheel, not the checkout."""
    from kfp import compiler
    from pod_control import control

    compiled = tmp_path / "control.yaml"
    compiler.Compiler().compile(control, str(compiled))
    pods: PodLauncher = world["pods"]
    run = pods.run(compiled, {}, tmp_path / "pods.log")
    assert not run.succeeded
    assert "No such file or directory" in run.tail() and "left-behind.txt" in run.tail()
    package, home, env = json.loads(run.output("where"))
    assert not Path(package).is_relative_to(CHECKOUT), package
    assert Path(package).is_relative_to(pods.image_py.parents[1]), package
    assert Path(home).is_relative_to(pods.pods)
    assert set(world["secret_vars"]) <= set(env), "the Secrets' variables reach the pod"
    assert not {"MLFLOW_TRACKING_URI", "FLYWHEEL_STATE_DIR", "VIRTUAL_ENV"} & set(env)
    # The same YAML with the tasks sharing one process environment and working directory.
    plain = PodLauncher(tmp_path / "plain", pods.image_py, {})
    plain.script.write_text(f'#!/bin/sh\nexec {pods.image_py} "$@"\n')
    assert plain.run(compiled, {}, tmp_path / "plain.log").succeeded


def test_no_secret_value_is_compiled_into_the_yaml(world):
    assert set(world["secret_vars"]) >= {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
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
    # Every task ran in its own pod, and every pod's disk is gone.
    pods = world["pods"].pods_run()
    assert len(pods) >= 8 and len({p["pod"] for p in pods}) == len(pods)
    assert not any(Path(p["pod"]).exists() for p in pods)


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
