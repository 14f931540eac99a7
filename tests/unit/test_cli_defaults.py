"""Stage commands without --data take the newest prepared dataset, and `evaluate` without a
model the champion (issue 12, "what users of the CLI asked for"); each says which on stderr,
or fails in one line saying what to do first.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from flywheel.artifacts import MANIFEST
from flywheel.defaults import DATASETS, newest_dataset

# ------------------------------------------------------------- the pure choice


def _dataset(store: Path, name: str, mtime_ns: int) -> Path:
    path = store / name
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"schema_version": 1, "content_hash": name}))
    os.utime(path / MANIFEST, ns=(mtime_ns, mtime_ns))
    return path


def test_newest_dataset_is_the_last_manifest_written(tmp_path):
    store = tmp_path / DATASETS
    older = _dataset(store, "bbbbbbbbbbbb", 1_000_000_000_000)
    newer = _dataset(store, "aaaaaaaaaaaa", 2_000_000_000_000)
    # Not candidates: a running stage's working directory (hidden, newest of all), a failed
    # run's reports (no manifest), a stray file.
    _dataset(store, ".dataset.incoming-1-0000abcd", 3_000_000_000_000)
    (store / "cccccccccccc.failed").mkdir()
    (store / "cccccccccccc.failed" / "rejects.jsonl").write_text("{}\n")
    (store / "notes.txt").write_text("mine")
    assert newest_dataset(store) == newer
    # The same hash prepared again is replaced in place: it becomes the newest.
    os.utime(older / MANIFEST, ns=(4_000_000_000_000, 4_000_000_000_000))
    assert newest_dataset(store) == older


def test_newest_dataset_ties_go_to_the_name_and_absence_is_none(tmp_path):
    store = tmp_path / DATASETS
    assert newest_dataset(store) is None  # no store yet
    store.mkdir()
    assert newest_dataset(store) is None  # an empty store
    _dataset(store, "aaaaaaaaaaaa", 5_000_000_000_000)
    b = _dataset(store, "bbbbbbbbbbbb", 5_000_000_000_000)
    assert newest_dataset(store) == b


# ------------------------------------------------------------------- the CLI


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh working directory whose state directory is .flywheel (pinned)."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(root / ".flywheel"))
    return root


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", ["train", "tune", "evaluate"])
def test_no_prepared_dataset_is_one_line_saying_to_prepare_first(project, cli, command):
    code, out, err = cli(command)
    assert code == 1 and out == ""
    store = project / ".flywheel" / DATASETS
    assert err == [
        f"error: no prepared dataset in {store}; run `flywheel data prepare` first, "
        "or pass --data DIR"
    ]
    assert _tree(project) == []  # looking created nothing, not even the state directory


def test_the_chosen_dataset_is_said_after_the_other_checks(project, cli):
    """An unusable --out is still the one line: the choice is announced only once it holds."""
    _dataset(project / ".flywheel" / DATASETS, "aaaaaaaaaaaa", 1_000_000_000_000)
    (project / "notes.txt").write_text("mine")
    code, out, err = cli("train", "--out", "notes.txt")
    assert code == 1 and out == ""
    assert err == ["error: --out notes.txt: exists and is not a directory"]


def test_evaluate_without_a_model_and_no_champion_says_so(project, cli):
    _dataset(project / ".flywheel" / DATASETS, "aaaaaaaaaaaa", 1_000_000_000_000)
    code, out, err = cli("evaluate", "eval.max_docs=6")  # an override is not a model
    assert code == 1 and out == ""
    uri = f"sqlite:///{project / '.flywheel' / 'mlflow' / 'mlflow.db'}"
    assert err == [
        f"error: flywheel-lm has no champion at {uri}; name a model directory or promote "
        "a version (`flywheel models promote V`)"
    ]


def test_evaluate_without_arguments_scores_the_champion_on_the_newest_dataset(project, cli, capsys):
    from fixtures_models import (
        build_eval_dataset,
        fresh_model,
        save_model,
        split_paragraphs,
        train_tokenizer,
    )

    from flywheel.config import load_profile
    from flywheel.registry import Registry, lineage_tags

    store = project / ".flywheel" / DATASETS
    old = build_eval_dataset(store / "aaaaaaaaaaaa", max_docs=3)
    new = build_eval_dataset(store / "bbbbbbbbbbbb", max_docs=5)
    os.utime(old / MANIFEST, ns=(1_000_000_000_000, 1_000_000_000_000))
    os.utime(new / MANIFEST, ns=(2_000_000_000_000, 2_000_000_000_000))
    tok = train_tokenizer(split_paragraphs()[0])
    model = save_model(fresh_model(tok), tok, project / "model")
    registry = Registry(load_profile())
    version = registry.register_candidate(
        model, tags=lineage_tags(data_hash="h", trigger_reason="test"), model_card="# m"
    )
    registry.promote(version, reason="first", actor="test")
    capsys.readouterr()  # the set-up's own output (MLflow's upload bar)

    code, out, err = cli("evaluate", "eval.bootstrap_samples=20")
    assert code == 0, err
    # transformers was imported before the command here (its bar is off in a fresh process).
    err = [line for line in err if not line.startswith("Loading weights")]
    assert err == [
        f"data: {new} (newest prepared dataset)",
        f"model: models:/flywheel-lm@champion (champion, version {version})",
    ]
    # Scored on the newest dataset's 5 documents, not the older one's 3.
    assert "models:/flywheel-lm@champion" in out
    assert re.search(r"n_docs\W+5\.0\b", out), out


# --------------------------------------------------------- monitor --json


def test_the_monitor_document_carries_the_decision_and_its_numbers():
    from flywheel.cli.pipeline import monitor_document

    facts = {
        "pipeline_run_id": "r1",
        "retrain": True,
        "version": "4",
        "verdict": "PROMOTE",
        "stage_seconds": {"drift-check": 1.5},
    }
    drift = {
        "metrics": {"retrain": 1.0, "share_drifted": 0.75, "stage_seconds": 1.5},
        "tags": {"decision": "drift: 3 of 4 descriptors", "window": "w.jsonl"},
    }
    doc = monitor_document(facts, drift, True, None, None)
    assert doc == {
        "pipeline_run_id": "r1",
        "version": "4",
        "verdict": "PROMOTE",
        "state": "succeeded",
        "failed_task": None,
        "error": None,
        "retrain": True,
        "decision": "drift: 3 of 4 descriptors",
        "window": "w.jsonl",
        "drift": {"share_drifted": 0.75, "stage_seconds": 1.5},
        "stage_seconds": {"drift-check": 1.5},
    }
    # A run that failed before the drift check recorded anything: no decision, no retrain.
    failed = monitor_document({"pipeline_run_id": "r2"}, {}, False, "drift-check", "DataError: x")
    assert failed["state"] == "failed" and failed["failed_task"] == "drift-check"
    assert failed["retrain"] is False and failed["decision"] is None and failed["drift"] == {}
    assert json.loads(json.dumps(failed)) == failed  # one plain JSON document
