"""Compile every pipeline and assert its structure: tasks, edges, conditions, exit handler,
artifact types, image and resources. No secret from the environment reaches the YAML."""

from __future__ import annotations

import pytest
import yaml

from flywheel.config import load_profile
from flywheel.kfp.compile import available, compile_pipeline


@pytest.fixture(scope="module")
def retrain_spec(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    profile = load_profile(None, ["kfp.image=registry.example.com/flywheel:9.9.9"])
    return yaml.safe_load(compile_pipeline("retrain", profile, out).read_text())


def _tasks(dag: dict) -> dict:
    return dag["dag"]["tasks"]


def _all_tasks(spec: dict) -> dict:
    """Task name -> task spec, over the root and every sub-DAG (conditions, exit handler)."""
    out = dict(_tasks(spec["root"]))
    for comp in spec["components"].values():
        if "dag" in comp:
            out.update(comp["dag"]["tasks"])
    return out


def test_every_pipeline_compiles(tmp_path):
    names = available()
    assert "retrain" in names
    for name in names:
        assert compile_pipeline(name, load_profile(), tmp_path).is_file()


def test_retrain_tasks_and_display_names(retrain_spec):
    tasks = _all_tasks(retrain_spec)
    for name in [
        "plan",
        "prepare-data",
        "tune",
        "skip-tune",
        "train",
        "evaluate",
        "evaluate-champion",
        "gate",
        "promote",
        "summary",
    ]:
        assert name in tasks, f"missing task {name}"
    assert tasks["train"]["taskInfo"]["name"] == "Train (DeepSpeed on Ray Train)"
    assert all(t["taskInfo"]["name"] for t in tasks.values())


def test_retrain_edges(retrain_spec):
    tasks = _all_tasks(retrain_spec)
    assert "plan" in tasks["prepare-data"]["dependentTasks"]
    assert set(tasks["gate"]["dependentTasks"]) >= {
        "evaluate",
        "evaluate-champion",
        "train",
        "prepare-data",
    }
    assert (
        "train" in tasks["evaluate-champion"]["dependentTasks"]
    )  # champion evaluated after training
    params = tasks["train"]["inputs"]["parameters"]["params"]
    assert "taskOutputParameter" in params and params["taskOutputParameter"][
        "producerTask"
    ].startswith("condition-branches")


def test_retrain_conditions_and_exit_handler(retrain_spec):
    tasks = _all_tasks(retrain_spec)
    conditions = {
        name: t["triggerPolicy"]["condition"]
        for name, t in tasks.items()
        if "triggerPolicy" in t and "condition" in t["triggerPolicy"]
    }
    assert "inputs.parameter_values['pipelinechannel--gate-Output'] != ''" in conditions.values(), (
        conditions
    )
    assert (
        "inputs.parameter_values['pipelinechannel--plan-Output'] == true" in conditions.values()
    ), conditions
    root = _tasks(retrain_spec["root"])
    assert root["summary"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "exit-handler-1" in root["summary"]["dependentTasks"]


def test_retrain_artifact_types(retrain_spec):
    comps = retrain_spec["components"]
    outs = {name: c.get("outputDefinitions", {}).get("artifacts", {}) for name, c in comps.items()}
    assert outs["comp-prepare-data"]["dataset"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert outs["comp-train"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert outs["comp-train"]["loss_curve"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outs["comp-gate"]["decision"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outs["comp-gate"]["model_card"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outs["comp-tune"]["plots"]["artifactType"]["schemaTitle"] == "system.HTML"
    for comp in ("comp-prepare-data", "comp-train", "comp-evaluate", "comp-gate", "comp-tune"):
        assert outs[comp]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


def test_retrain_image_and_resources(retrain_spec):
    executors = retrain_spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {
        "registry.example.com/flywheel:9.9.9"
    }
    train = executors["exec-train"]["container"]["resources"]
    assert train["cpuLimit"] == 8.0 and train["memoryLimit"] == 32.0
    assert train["resourceCpuRequest"] == "8" and train["resourceMemoryRequest"] == "32G"
    # no pip install of kfp at task start: the image carries it
    assert all("pip install" not in " ".join(e["container"]["command"]) for e in executors.values())


def test_pipeline_parameters_are_few_and_typed(retrain_spec):
    params = retrain_spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"profile", "trigger_reason", "data_location"}
    assert params["profile"]["parameterType"] == "STRUCT"


def test_retries_and_caching_from_profile(tmp_path):
    p = load_profile(
        None, ["kfp.resources.train={cpu: '4', memory: 16G, retries: 3, caching: true}"]
    )
    spec = yaml.safe_load(compile_pipeline("retrain", p, tmp_path).read_text())
    train = _all_tasks(spec)["train"]
    assert train["retryPolicy"]["maxRetryCount"] == 3
    assert train["cachingOptions"].get("enableCache") is True


def test_no_secret_from_environment_in_yaml(tmp_path, monkeypatch):
    secret = "s3cr3t-token-do-not-leak"
    monkeypatch.setenv("KF_PIPELINES_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    p = load_profile(None, ["kfp.token_env=KF_PIPELINES_TOKEN"])
    for name in available():
        assert secret not in compile_pipeline(name, p, tmp_path).read_text()


@pytest.fixture(scope="module")
def monitor_spec(tmp_path_factory):
    out = tmp_path_factory.mktemp("build-monitor")
    return yaml.safe_load(compile_pipeline("monitor", load_profile(), out).read_text())


def _parents(spec: dict, component: str) -> list[tuple[str, dict]]:
    """(task name, task) of every task, in any DAG, whose component is `component`."""
    dags = {"root": spec["root"], **{n: c for n, c in spec["components"].items() if "dag" in c}}
    return [
        (name, t)
        for d in dags.values()
        for name, t in d["dag"]["tasks"].items()
        if t["componentRef"]["name"] == component
    ]


def test_monitor_nests_retrain_under_the_drift_condition(monitor_spec):
    tasks = _all_tasks(monitor_spec)
    assert "drift-check" in tasks and "no-retrain" in tasks
    nested = _parents(monitor_spec, "comp-flywheel-retrain")
    assert len(nested) == 1, "the retrain pipeline is nested exactly once"
    # the nested retrain's DAG is the condition branch guarded by the drift decision
    holder = next(
        n
        for n, c in monitor_spec["components"].items()
        if "dag" in c and "flywheel-retrain" in c["dag"]["tasks"]
    )
    ((_, condition),) = _parents(monitor_spec, holder)
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--drift-check-Output'] != ''"
    )
    branches = monitor_spec["root"]["dag"]["tasks"]["condition-branches-1"]
    assert branches["dependentTasks"] == ["drift-check"]
    reason = branches["inputs"]["parameters"]["pipelinechannel--drift-check-Output"][
        "taskOutputParameter"
    ]
    assert reason == {"outputParameterKey": "Output", "producerTask": "drift-check"}
    assert nested[0][1]["inputs"]["parameters"]["trigger_reason"] == {
        "componentInputParameter": "pipelinechannel--drift-check-Output"
    }
    # the nested retrain keeps its own exit handler
    comp = monitor_spec["components"]["comp-flywheel-retrain"]["dag"]["tasks"]
    assert comp["summary"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def _run_ids(spec: dict) -> set[str]:
    """The constant every task's run_id input resolves from, over all DAGs."""
    dags = [spec["root"], *(c for c in spec["components"].values() if "dag" in c)]
    return {
        t["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
        for d in dags
        for t in d["dag"]["tasks"].values()
        if "run_id" in t.get("inputs", {}).get("parameters", {})
    }


def test_run_ids_come_from_the_job_id_placeholder(retrain_spec, monitor_spec):
    """The job id is unique per run; the job *name* is the display name on a cluster and
    repeats, so ledger entries of two runs would mix."""
    from kfp import dsl

    assert _run_ids(retrain_spec) == {dsl.PIPELINE_JOB_ID_PLACEHOLDER}
    # the monitor and its nested retrain: one run, one id (see pipelines/retrain.py)
    assert _run_ids(monitor_spec) == {dsl.PIPELINE_JOB_ID_PLACEHOLDER}
    with_run_id = {
        name
        for name, t in _all_tasks(monitor_spec).items()
        if "run_id" in t.get("inputs", {}).get("parameters", {})
    }
    assert {"drift-check", "no-retrain", "plan", "train", "gate", "summary"} <= with_run_id


def test_ledger_stages_of_monitor_and_nested_retrain_are_disjoint():
    """Sharing the monitor's run id is safe only while no stage name repeats: the summary
    reads one entry per stage, and the monitor counts a run with `plan` and no `summary`
    as a retrain in flight."""
    import re
    from pathlib import Path

    import flywheel.stages as stages

    source = Path(stages.__file__).read_text()
    monitor = {"drift-check", "no-retrain"}
    from flywheel import contracts

    # A stage is named by a literal or by its constant in flywheel.contracts.
    pattern = r'ledger\.(?:record|stage)\(\s*p,\s*run_id,\s*(?:"([\w-]+)"|contracts\.([A-Z_]+))'
    recorded = {lit or getattr(contracts, name) for lit, name in re.findall(pattern, source)}
    recorded |= {"evaluate-champion", "evaluate-challenger"}  # named through a variable
    assert monitor <= recorded and {"plan", "summary"} <= recorded
    assert not ({"plan", "summary"} & monitor)


def test_evaluate_champion_has_its_own_resource_key(tmp_path):
    p = load_profile(
        None,
        [
            "kfp.resources.evaluate={cpu: '3', memory: 6G}",
            "kfp.resources.evaluate-champion={cpu: '5', memory: 10G}",
        ],
    )
    executors = yaml.safe_load(compile_pipeline("retrain", p, tmp_path).read_text())[
        "deploymentSpec"
    ]["executors"]
    assert executors["exec-evaluate"]["container"]["resources"]["resourceCpuLimit"] == "3"
    assert executors["exec-evaluate-champion"]["container"]["resources"]["resourceCpuLimit"] == "5"
