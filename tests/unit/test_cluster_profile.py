"""The cluster profile, the Kubernetes settings' validation, and the guard before Kubeflow:
`pod_state_problems` case by case, and the CLI that refuses (submit, schedule create) or
warns (compile)."""

from __future__ import annotations

import re
import socket

import pytest

from flywheel.cli.main import main
from flywheel.config import CONFIG_DIR, SIDE_EFFECT_TASKS, load_profile
from flywheel.errors import ConfigError
from flywheel.kfp.guard import pod_state_problems

CLUSTER = CONFIG_DIR / "cluster.yaml"
# What makes the default profile cluster-ready: a tracking server, Optuna on PostgreSQL,
# checkpoints and run data in object storage.
READY = [
    "registry.tracking_uri=http://mlflow.example:5000",
    "tune.storage=postgresql+psycopg2://optuna@pg.example:5432/optuna",
    "storage.root=s3://bucket/flywheel",
]


def ready(*extra: str):
    return load_profile(None, [*READY, *extra])


# ------------------------------------------------------------------- the profile


def test_cluster_profile_is_ready_for_kubeflow():
    p = load_profile(CLUSTER)
    assert pod_state_problems(p) == []
    assert re.fullmatch(r".+@sha256:[0-9a-f]{64}", p.kfp.image), "image pinned by digest"
    assert p.registry.tracking_uri.startswith("http://")
    assert p.tune.storage.startswith("postgresql") and "@" in p.tune.storage
    assert ":" not in p.tune.storage.split("//")[1].split("@")[0], "no password in the URL"
    assert p.storage.root.startswith("s3://")
    k8s = p.kfp.kubernetes
    assert k8s.service_account
    assert "PGPASSWORD" in k8s.env_from_secrets("tune")
    assert "PGPASSWORD" not in k8s.env_from_secrets("train")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= k8s.env_from_secrets("train")
    for task in ("train", "tune"):
        res = p.kfp.for_task(task)
        assert res.accelerator_count >= 1 and res.node_selector and res.tolerations
        assert res.shm_size
    assert p.kfp.for_task("train").accelerator_count == p.train.scaling.num_workers


def _documented(text: str) -> dict[str, bool]:
    """Dotted key -> whether a comment sits on the line above it (or at its end)."""
    out: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        m = re.match(r"^(\s*)(?:- )?([A-Za-z_][\w.-]*):", line)
        if m and not stripped.startswith("#"):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            out[".".join(k for _, k in stack)] = previous.startswith("#") or " # " in line
        if stripped:
            previous = stripped
    return out


def test_cluster_profile_documents_every_field():
    text = CLUSTER.read_text()
    assert text.startswith("# ") and "flywheel submit" in text.split("\nname:")[0]
    assert "flywheel compile --profile configs/cluster.yaml" in text
    documented = _documented(text)
    # the parser sees the fields the cluster needs (so an empty result cannot pass)
    for key in [
        "tune.storage",
        "registry.tracking_uri",
        "storage.root",
        "kfp.image",
        "kfp.kubernetes.service_account",
        "kfp.kubernetes.secrets",
        "kfp.resources.tune.node_selector",
        "kfp.resources.tune.tolerations",
        "kfp.resources.tune.shm_size",
        "kfp.resources.evaluate-champion",
    ]:
        assert key in documented, key
    missing = [key for key, ok in documented.items() if not ok]
    assert missing == [], f"cluster.yaml: fields without a comment: {missing}"


# ------------------------------------------------------------------ bad profiles


@pytest.mark.parametrize(
    "override, field",
    [
        ("kfp.kubernetes.secrets=[{name: '', env: {password: PGPASSWORD}}]", "secrets.0.name"),
        ("kfp.kubernetes.secrets=[{env: {password: PGPASSWORD}}]", "secrets.0.name"),
        (
            "kfp.kubernetes.secrets=[{name: Db_Creds, env: {password: PGPASSWORD}}]",
            "secrets.0.name",
        ),
        ("kfp.kubernetes.secrets=[{name: db, env: {}}]", "secrets.0"),
        ("kfp.kubernetes.secrets=[{name: db, env: {password: 9PG}}]", "secrets.0"),
        (
            "kfp.kubernetes.secrets=[{name: db, env: {password: PGPASSWORD}, tasks: [tuner]}]",
            "secrets.0",
        ),
        ("kfp.kubernetes.pvcs=[{name: data, mount_path: data}]", "pvcs.0"),
        ("kfp.kubernetes.service_account=Runner", "kubernetes"),
        ("kfp.resources.trian={cpu: '1'}", "kfp.resources.trian"),
        ("kfp.resources.train={shm_size: lots}", "kfp.resources.train.shm_size"),
        (
            "kfp.resources.train={tolerations: [{key: g, operator: Exists, value: x}]}",
            "tolerations",
        ),
        ("kfp.ui_url=kubeflow.example.com", "kfp.ui_url"),
    ],
)
def test_bad_kubernetes_settings_fail_at_load_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_profile(CLUSTER, [override])
    msg = str(err.value)
    assert "cluster.yaml" in msg and field in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("task", sorted(SIDE_EFFECT_TASKS))
def test_caching_a_side_effect_task_is_a_config_error(task):
    with pytest.raises(ConfigError, match=rf"kfp\.resources\.{task}\.caching: {task} "):
        load_profile(None, [f"kfp.resources.{task}={{caching: true}}"])


def test_caching_is_inherited_only_by_tasks_without_side_effects():
    p = load_profile(
        None,
        [
            "kfp.resources.default={caching: true}",
            "kfp.resources.evaluate={cpu: '3', caching: true}",
        ],
    )
    assert p.kfp.for_task("prepare-data").caching and p.kfp.for_task("evaluate").caching
    for task in SIDE_EFFECT_TASKS:
        assert not p.kfp.for_task(task).caching, task
    # evaluate-champion takes evaluate's shape, never its caching
    champion = p.kfp.for_task("evaluate-champion")
    assert champion.cpu == "3" and not champion.caching


# ------------------------------------------------------------------------- guard


def _fields(problems: list[str]) -> list[str]:
    return [p.split(" ", 1)[0] for p in problems]


def test_default_profile_names_every_store_that_would_live_in_a_pod():
    problems = pod_state_problems(load_profile(None))
    assert _fields(problems) == ["registry.tracking_uri", "tune.storage", "storage.root"]
    assert "http://" in problems[0] and "postgresql" in problems[1] and "s3://" in problems[2]


def test_a_ready_profile_has_no_problem():
    assert pod_state_problems(ready()) == []
    assert pod_state_problems(ready(), "s3://bucket/window/") == []


@pytest.mark.parametrize(
    "overrides, data_location, field",
    [
        (["registry.tracking_uri=sqlite:///mlflow.db"], None, "registry.tracking_uri"),
        (["registry.tracking_uri=./mlruns"], None, "registry.tracking_uri"),
        (["registry.tracking_uri=file:///mnt/mlruns"], None, "registry.tracking_uri"),
        (["registry.tracking_uri=postgresql://mlflow@db/mlflow"], None, "registry.tracking_uri"),
        (["registry.tracking_uri=http://u:pw@mlflow:5000"], None, "registry.tracking_uri"),
        (["tune.storage=sqlite:///optuna.db"], None, "tune.storage"),
        (["tune.storage=postgresql://optuna:hunter2@pg/optuna"], None, "tune.storage"),
        (["storage.root=checkpoints"], None, "storage.root"),
        (["storage.root=/var/flywheel"], None, "storage.root"),
        (["storage.root=file:///var/flywheel"], None, "storage.root"),
        (["drift.window=data/window.jsonl"], None, "drift.window"),
        (["data.source.kind=files", "data.source.path=/home/me/corpus"], None, "data.source.path"),
        (["data.source.kind=hf", "data.source.path=./saved"], None, "data.source.path"),
        ([], "/data/window.jsonl", "--data-location"),
        ([], "file:///data/window", "--data-location"),
    ],
)
def test_each_pod_local_setting_is_named(overrides, data_location, field):
    problems = pod_state_problems(ready(*overrides), data_location)
    assert _fields(problems) == [field], problems
    assert "hunter2" not in problems[0] and ":pw@" not in problems[0]


@pytest.mark.parametrize(
    "overrides",
    [
        ["tune.enabled=false", "tune.storage=null"],
        ["registry.tracking_uri=https://mlflow.example"],
        ["registry.tracking_uri=databricks"],
        ["data.source.kind=hf", "data.source.path=wikitext"],  # a hub id, not a path
        ["data.source.kind=files", "data.source.path=gs://corpus/2026/"],
        ["drift.window=s3://prod/window/"],
        # a path on a claim every task mounts is shared
        ["kfp.kubernetes.pvcs=[{name: runs, mount_path: /runs}]", "storage.root=/runs/flywheel"],
    ],
)
def test_shared_settings_pass(overrides):
    assert pod_state_problems(ready(*overrides)) == []


def test_tracking_uri_from_a_secret_for_every_task_counts():
    secret = "kfp.kubernetes.secrets=[{name: mlflow, env: {uri: MLFLOW_TRACKING_URI}}]"
    p = load_profile(None, [*READY[1:], secret])
    assert pod_state_problems(p) == []
    only_train = secret.replace("}}]", "}, tasks: [train]}]")
    p = load_profile(None, [*READY[1:], only_train])
    assert _fields(pod_state_problems(p)) == ["registry.tracking_uri"]


def test_a_claim_mounted_by_some_tasks_only_is_not_shared():
    p = ready("kfp.kubernetes.pvcs=[{name: runs, mount_path: /runs, tasks: [train]}]")
    p = p.model_copy(update={"storage": p.storage.model_copy(update={"root": "/runs/x"})})
    assert _fields(pod_state_problems(p)) == ["storage.root"]


# --------------------------------------------------------------------------- CLI


def _cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def dead_host():
    """A port nothing listens on: the guard must answer before any connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "retrain"],
        ["submit", "retrain", "--dry-run"],
        ["schedule", "create", "monitor", "--cron", "0 3 * * *"],
        ["schedule", "create", "monitor", "--cron", "0 3 * * *", "--dry-run"],
    ],
)
def test_submit_and_schedule_refuse_pod_state_with_one_line(command, dead_host, state_dir, capsys):
    code, _out, err = _cli([*command, "--host", dead_host], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for field in ("registry.tracking_uri", "tune.storage", "storage.root"):
        assert field in lines[0]
    assert "local.yaml" in lines[0] and "Traceback" not in err
    assert not (state_dir / "compiled").exists(), "refused before compiling"


def test_submit_refuses_a_local_data_location(dead_host, state_dir, capsys):
    code, _, err = _cli(
        ["submit", "retrain", "--profile", str(CLUSTER), "--host", dead_host,
         "--data-location", "corpus/"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--data-location 'corpus/' is a local path" in err


def test_compile_warns_in_the_same_words_and_writes_the_yaml(state_dir, tmp_path, capsys):
    code, _out, err = _cli(["compile", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    for problem in pod_state_problems(load_profile(None)):
        assert f"warning: {problem}" in err
    assert (tmp_path / "out" / "retrain.yaml").is_file()
    code, _, err = _cli(
        ["compile", "--profile", str(CLUSTER), "--out", str(tmp_path / "c")], capsys
    )
    assert code == 0 and "warning" not in err


def test_compile_warnings_print_paths_verbatim(state_dir, tmp_path, capsys):
    """A path with brackets is printed as written, not read as terminal markup."""
    code, _out, err = _cli(
        ["compile", *READY, "data.source.kind=files", "data.source.path=/data/[bold]/corpus",
         "--out", str(tmp_path / "out")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "warning: data.source.path '/data/[bold]/corpus' is a local path" in err
