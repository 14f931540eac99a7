"""The CLI's stage commands run the pipeline's own steps (`flywheel.stages`), and find what the
user left out (issue 12): real Ray (the module's), real DeepSpeed, real MLflow, a tiny model.

1. `flywheel train` without --data trains on the newest prepared dataset, says which, and
   records like the pipeline's train step: the ledger entry under a `cli-...` run id, the
   lineage tags, the drift reference logged with the training run.
2. With a champion, `flywheel train` warm-starts from it, as the train step does.
3. `flywheel monitor --json` prints one JSON document on stdout, also when a task failed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from fixtures_cli import flywheel, nonblank
from fixtures_data import TINY_OVERRIDES, build_dataset, pydoc_texts

from flywheel import artifacts, ledger
from flywheel.config import load_profile

pytestmark = pytest.mark.integration

# Four steps are enough to show which data and which start the step took.
STEPS = ["train.max_steps=4", "train.checkpoint_every=4", "train.warmup_steps=1"]


def _with_reference(dataset: Path) -> Path:
    """The text samples the real data stage writes (the monitor reads the reference)."""
    texts = pydoc_texts(120)
    frame = pd.DataFrame(
        {
            "id": [f"doc-{i}" for i in range(len(texts))],
            "source": "pydoc",
            "timestamp": pd.Timestamp("2026-01-01"),
            "text": texts,
        }
    )
    (dataset / artifacts.TEXT_DIR).mkdir(exist_ok=True)
    frame.to_parquet(dataset / artifacts.REFERENCE_TEXT)
    frame.tail(40).to_parquet(dataset / artifacts.TEST_TEXT)
    return dataset


@pytest.fixture(scope="module")
def world(ray_workdir):
    """Two prepared datasets in the state directory's store; the newer one sorts first."""
    state = ray_workdir / ".flywheel"
    store = state / "datasets"
    older = build_dataset(store / "bbbbbbbbbbbb", block_size=32, vocab_size=512, max_docs=60)
    newer = _with_reference(
        build_dataset(store / "aaaaaaaaaaaa", block_size=32, vocab_size=512, max_docs=120)
    )
    os.utime(older / artifacts.MANIFEST, ns=(1_000_000_000_000, 1_000_000_000_000))
    os.utime(newer / artifacts.MANIFEST, ns=(2_000_000_000_000, 2_000_000_000_000))
    args = [f"state_dir={state}", *TINY_OVERRIDES, *STEPS]
    return {"root": ray_workdir, "newer": newer, "older": older, "args": args}


def _train_entries(profile) -> list[dict]:
    """The ledger's train entries of CLI runs, oldest first, with the training run's tags."""
    from mlflow import MlflowClient

    from flywheel.tracking import experiment_id, tracking_uri

    client = MlflowClient(tracking_uri(profile))
    runs = client.search_runs(
        [experiment_id(profile)],
        filter_string=f"tags.`{ledger.STAGE_TAG}` = 'train'",
        order_by=["attributes.start_time ASC"],
    )
    out = []
    for run in runs:
        if "training_run_id" not in run.data.tags:
            continue  # the training run itself (also tagged with its stage), not a ledger entry
        training = client.get_run(run.data.tags["training_run_id"])
        logged = {a.path for a in client.list_artifacts(training.info.run_id, "data")}
        out.append(
            {
                "ledger": run.data.tags,
                "training": training.data.tags,
                "params": training.data.params,
                "logged": logged,
            }
        )
    return out


@pytest.fixture(scope="module")
def first_train(world):
    from flywheel.cli.common import console, err_console
    from flywheel.cli.main import main

    # The `cli` fixture is per test; this run is shared by the tests below.
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "400")
    console.file = err_console.file = None
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["train", *world["args"]])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    mp.undo()
    return code, out.getvalue(), nonblank(err.getvalue())


def test_train_without_data_takes_the_newest_dataset_through_the_train_step(world, first_train):
    code, out, err = first_train
    assert code == 0, err
    # Said once, first, on stderr: the newer dataset although its name sorts after the other.
    assert err[0] == f"data: {world['newer']} (newest prepared dataset)", err
    assert "loss (first -> final)" in out  # the training table, on stdout
    profile = load_profile(None, world["args"])
    [entry] = _train_entries(profile)
    run_id = entry["ledger"][ledger.RUN_TAG]
    assert re.fullmatch(r"cli-\d{8}-\d{6}-[0-9a-f]{6}", run_id), run_id
    # The train step's lineage: the pipeline run id, the trigger, the data, the start.
    newer_hash = json.loads((world["newer"] / artifacts.MANIFEST).read_text())["content_hash"]
    assert entry["training"][ledger.RUN_TAG] == run_id
    assert entry["training"]["flywheel.trigger_reason"] == "cli"
    assert entry["training"]["flywheel.data_hash"] == newer_hash
    assert entry["training"]["flywheel.warm_start"] == "False"  # no champion yet
    assert entry["params"]["plan.model_source"] == "fresh"
    # The drift reference is kept with the training run, where the monitor looks for it.
    assert "data/reference.parquet" in entry["logged"]
    [model] = (world["root"] / ".flywheel" / "models").iterdir()
    assert (model / "config.json").is_file()


@pytest.fixture(scope="module")
def champion(world, first_train):
    """The first CLI-trained model, registered with its lineage and promoted."""
    from flywheel.registry import Registry, lineage_tags

    profile = load_profile(None, world["args"])
    [first] = _train_entries(profile)
    [model] = (world["root"] / ".flywheel" / "models").iterdir()
    registry = Registry(profile)
    version = registry.register_candidate(
        model,
        tags=lineage_tags(
            data_hash=first["training"]["flywheel.data_hash"],
            training_run_id=first["ledger"]["training_run_id"],
            trigger_reason="cli",
        ),
        model_card="# first",
    )
    registry.promote(version, reason="test", actor="test")
    return {"model": model, "version": version}


def test_train_warm_starts_from_the_champion_like_the_train_step(world, champion, cli):
    profile = load_profile(None, world["args"])
    model = champion["model"]
    out_dir = world["root"] / "warm"
    code, _, err = cli(
        "train", "--data", str(world["newer"]), "--out", str(out_dir), *world["args"]
    )
    assert code == 0, err
    assert not any(line.startswith("data:") for line in err)  # --data given: nothing to say
    first, second = _train_entries(profile)
    assert second["ledger"][ledger.RUN_TAG] != first["ledger"][ledger.RUN_TAG]
    assert second["training"]["flywheel.warm_start"] == "True"
    assert second["params"]["plan.model_source"] == "init_from"
    assert second["params"]["plan.model_path"] != str(model.resolve())  # the registry's copy
    assert (out_dir / "config.json").is_file()


def test_monitor_json_prints_one_document_also_when_a_task_fails(world, tmp_path):
    window = tmp_path / "window.jsonl"
    window.write_text("")  # empty: the drift check fails on it, before any champion lookup
    state = tmp_path / "state"
    done = flywheel(
        world["root"], "monitor", "--json", "--window", str(window), f"state_dir={state}"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)  # the whole of stdout: one document, nothing else
    assert doc["state"] == "failed" and doc["failed_task"] == "drift-check"
    assert doc["retrain"] is False and doc["decision"] is None
    assert "is empty: no records" in doc["error"]
    lines = nonblank(done.stderr)
    assert lines[-1].startswith("error: pipeline monitor failed in task 'drift-check'")
    assert any("drift-check" in line for line in lines[:-1])  # progress went to stderr


def test_monitor_json_is_one_document_with_the_decision(world, champion, tmp_path):
    """A window of the champion's own reference documents, in the cooldown of its promotion:
    whatever the drift check measures, no retrain starts, and the document says why."""
    from drift_corpora import write_window

    texts = pd.read_parquet(world["newer"] / artifacts.REFERENCE_TEXT)["text"].tolist()
    window = write_window(texts, tmp_path / "same.jsonl")
    done = flywheel(
        world["root"],
        "monitor",
        "--json",
        "--window",
        str(window),
        *world["args"],
        "drift.min_rows=40",
        "drift.cooldown_hours=1000",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)  # the whole of stdout: one document, nothing else
    assert doc["state"] == "succeeded" and doc["retrain"] is False
    assert doc["window"] == str(window)
    assert doc["decision"] and doc["drift"]  # the reason and the numbers it rests on
    assert doc["drift"].keys() >= {"drifted", "stage_seconds"}
    assert isinstance(doc["pipeline_run_id"], str) and doc["pipeline_run_id"]
    assert "drift-check" in doc["stage_seconds"]
