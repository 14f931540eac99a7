"""The monitor loop through kfp.local: drift -> nested retrain, no drift -> nothing, cooldown.

Reference: the champion's own training sample of the Python docs (found through its lineage).
Windows: held-out documents of the same prepared corpus (no drift), and real text of another
kind that exists on a fresh machine: license texts (or standard-library source code).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from drift_corpora import license_paragraphs, stdlib_code_chunks, write_window

from flywheel import ledger
from flywheel.artifacts import TEST_TEXT
from flywheel.config import load_profile
from flywheel.kfp.local import run_local
from flywheel.registry import Registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A state dir with a champion trained on the Python docs, and a way to make profiles."""
    root = tmp_path_factory.mktemp("monitor")
    base = [
        f"state_dir={root / '.flywheel'}",
        "data.source.max_docs=600",
        "data.tokenizer.vocab_size=512",
        "data.block_size=32",
        "data.split.test_share=0.2",
        "model.context=32",
        "model.n_embd=32",
        "train.max_steps=10",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.checkpoint_every=10",
        "tune.enabled=false",
        "eval.max_docs=40",
        "eval.bootstrap_samples=50",
        "drift.min_rows=40",
    ]

    def profile(*extra: str):
        return load_profile(None, [*base, *extra])

    first = run_local("retrain", profile(), arguments={"trigger_reason": "bootstrap"})
    assert first.succeeded, first.log_file.read_text()[-3000:]
    dataset = first.run_dir / "prepare-data" / "dataset"
    return {"root": root, "profile": profile, "dataset": dataset}


def _monitor(profile, window: Path):
    return run_local("monitor", profile, arguments={"window": str(window)})


def test_same_distribution_window_starts_no_retrain(world):
    p = world["profile"]("drift.cooldown_hours=0")
    held_out = pd.read_parquet(world["dataset"] / TEST_TEXT)["text"].tolist()
    window = write_window(held_out, world["root"] / "same.jsonl")
    before = len(Registry(p).versions())
    run = _monitor(p, window)
    assert run.succeeded, run.log_file.read_text()[-3000:]
    stages = ledger.collect(p, run.run_id)
    assert stages["drift-check"]["metrics"]["retrain"] == 0.0
    assert stages["no-retrain"]["tags"]["reason"].startswith("no drift")
    assert "train" not in stages
    assert len(Registry(p).versions()) == before


def _shifted_texts() -> list[str]:
    texts = license_paragraphs()
    return texts if len(texts) >= 150 else stdlib_code_chunks(300)


def test_domain_shift_triggers_a_nested_retrain(world):
    p = world["profile"]("drift.cooldown_hours=0")
    window = write_window(_shifted_texts()[:300], world["root"] / "shifted.jsonl")
    before = {v.version for v in Registry(p).versions()}
    run = _monitor(p, window)
    assert run.succeeded, run.log_file.read_text()[-3000:]
    stages = ledger.collect(p, run.run_id)
    assert stages["drift-check"]["metrics"]["retrain"] == 1.0
    assert "no-retrain" not in stages
    # the nested retrain ran on the window and registered a candidate triggered by the drift
    assert {"prepare-data", "train", "gate", "summary"} <= set(stages)
    new = [v for v in Registry(p).versions() if v.version not in before]
    assert len(new) == 1
    assert new[0].tags["trigger_reason"].startswith("drift: ")
    assert new[0].tags["pipeline_run_id"] == run.run_id
    report = run.artifact("drift-check", "report")
    assert report is not None and "<html" in report.read_text()[:2000].lower()


def test_cooldown_blocks_a_second_trigger(world):
    p = world["profile"]("drift.cooldown_hours=24")
    assert (world["root"] / "shifted.jsonl").exists(), "runs after the nested retrain"
    # Source code drifts from whatever the champion now is: the nested retrain may have
    # promoted a model trained on the license window, whose reference that window matches.
    window = write_window(stdlib_code_chunks(300), world["root"] / "code.jsonl")
    before = len(Registry(p).versions())
    run = _monitor(p, window)
    assert run.succeeded
    stages = ledger.collect(p, run.run_id)
    assert stages["drift-check"]["metrics"]["retrain"] == 0.0
    assert "inside cooldown" in stages["no-retrain"]["tags"]["reason"]
    assert len(Registry(p).versions()) == before


def test_bad_window_fails_the_monitor_and_starts_nothing(world, tmp_path):
    p = world["profile"]("drift.cooldown_hours=0")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    before = len(Registry(p).versions())
    run = _monitor(p, empty)
    assert not run.succeeded
    assert len(Registry(p).versions()) == before
    assert run.failed_task and "drift-check" in run.failed_task
    assert "retrain" not in ledger.collect(p, run.run_id).get("drift-check", {}).get("metrics", {})
