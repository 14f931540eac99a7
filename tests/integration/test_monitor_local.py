"""The monitor loop through kfp.local under the default policy (drift.trigger=both):
drift and a worse champion -> nested retrain; no drift, or drift the champion handles ->
nothing; cooldown and a retrain in flight block.

References: the champion's own training sample of the Python docs and its held-out split
(found through its lineage). Windows: held-out documents of the same prepared corpus (no
drift), the longest paragraphs of the same docs (a narrower slice of the same source:
different text, the same model quality), and real text of another kind that exists on a
fresh machine: license texts (or standard-library source code).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from drift_corpora import license_paragraphs, pydoc_paragraphs, stdlib_code_chunks, write_window

from flywheel import ledger, stages
from flywheel.artifacts import TEST_TEXT
from flywheel.config import load_profile
from flywheel.forgetting import replay_count
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
        # Enough steps for the champion to model its domain: at 10 it was near-uniform, and
        # licence text cost it only +5% bits per byte (interval +2..+9%) over its own
        # held-out docs, no more than noise for drift.min_degradation 5%.
        "train.max_steps=60",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.checkpoint_every=60",
        "tune.enabled=false",
        "eval.max_docs=40",
        "eval.bootstrap_samples=50",
        "drift.min_rows=40",
    ]

    def profile(*extra: str):
        return load_profile(None, [*base, *extra])

    import ray

    dataset = _first_champion(profile(), root / "bootstrap")
    # Each stage stops the Ray it started: later tests in this process start from none.
    assert not ray.is_initialized(), "a stage left its Ray running in the caller's process"
    return {"root": root, "profile": profile, "dataset": dataset}


def _first_champion(profile, out: Path) -> Path:
    """The retrain DAG's steps in its order, through the library runners its components
    call, in this process (~1 min less than a kfp.local run; the monitor runs below are
    the kfp.local part). Returns the prepared dataset's directory."""
    p, run_id, why = profile.model_dump(), "bootstrap", "bootstrap"
    dataset, model = out / "dataset", out / "model"
    stages.plan(p, run_id)
    stages.prepare(p, "", dataset, run_id)
    trained = stages.train(p, dataset, None, model, why, run_id)
    stages.evaluate(p, model, dataset, out / "challenger.json", run_id)
    stages.evaluate(p, None, dataset, out / "champion.json", run_id)
    gate = stages.gate(
        p, out / "challenger.json", out / "champion.json", model, dataset,
        trained.mlflow_run_id or "", why, run_id,
    )  # fmt: skip
    assert gate.decision.promote, gate.decision_markdown
    stages.promote(p, gate.version, why, run_id)
    stages.summarize(p, run_id, "SUCCEEDED", "")
    return dataset


def _monitor(profile, window: Path):
    return run_local("monitor", profile, arguments={"window": str(window)})


def _check(profile, window: Path, out: Path):
    """The monitor's drift-check step alone (its library runner): the decision a monitor
    run acts on. The kfp.local monitor runs below cover the branches around it."""
    result = stages.drift_check(profile.model_dump(), str(window), out, f"check-{out.name}")
    return result.metrics(), result.decision


def test_same_distribution_window_starts_no_retrain(world, tmp_path):
    p = world["profile"]("drift.cooldown_hours=0")
    held_out = pd.read_parquet(world["dataset"] / TEST_TEXT)["text"].tolist()
    window = write_window(held_out, world["root"] / "same.jsonl")
    metrics, decision = _check(p, window, tmp_path)
    assert metrics["retrain"] == 0.0 and not decision.retrain
    assert decision.reason.startswith("no drift"), decision.reason
    # the champion's bits per byte on held-out documents of its own kind: no degradation
    assert metrics["window_bits_per_byte"] > 0 and metrics["reference_bits_per_byte"] > 0
    assert metrics["degradation_low"] < 0.05, metrics


def test_a_narrower_slice_of_the_same_source_drifts_but_starts_no_retrain(world, tmp_path):
    """Longer paragraphs of the same docs: every distribution test sees different text, and
    a retrain on it could not help, because the champion models it as well as ever."""
    p = world["profile"]("drift.cooldown_hours=0")
    longest = sorted(pydoc_paragraphs(), key=len, reverse=True)[:300]
    window = write_window(longest, world["root"] / "narrower.jsonl")
    metrics, decision = _check(p, window, tmp_path)
    assert metrics["drifted"] == 1.0, decision.reason
    assert metrics["retrain"] == 0.0 and not decision.retrain
    assert metrics["degradation_low"] <= 0.05, metrics
    assert decision.reason.startswith("drift: ") and "not significantly worse" in decision.reason


def test_a_retrain_in_flight_blocks_a_shift(world, tmp_path):
    """Another pipeline run has a `plan` entry and no `summary`: no second retrain.
    (drift.trigger=distribution: the guard is tested, not the policy.)"""
    p = world["profile"]("drift.cooldown_hours=0", "drift.trigger=distribution")
    window = write_window(_shifted_texts()[:300], world["root"] / "shifted.jsonl")
    ledger.record(p, "retrain-elsewhere", "plan")
    try:
        result = stages.drift_check(p.model_dump(), str(window), tmp_path, "monitor-x")
    finally:
        ledger.record(p, "retrain-elsewhere", "summary", {}, {"state": "SUCCEEDED"})
    assert not result.decision.retrain
    assert result.decision.reason.endswith("retrain already in flight: retrain-elsewhere")
    assert result.decision.reason.startswith("drift: ")
    # the HTML report carries the decision and the champion's numbers next to Evidently's
    html = result.report_html.read_text()
    assert "Retrain decision" in html and "bits/byte on its held-out sample" in html
    assert result.drift.window.sample is not None and result.drift.window.sample.is_file()


def _shifted_texts() -> list[str]:
    texts = license_paragraphs()
    return texts if len(texts) >= 150 else stdlib_code_chunks(300)


def test_domain_shift_triggers_a_nested_retrain(world):
    # drift.min_degradation=0 (significantly worse at all): this 60-step champion has
    # barely learned its domain, so licences cost it only a few percent more bits per
    # byte; a 200-step champion pays +24% (BENCHMARKS.md, the monitor), past the default 5%.
    p = world["profile"]("drift.cooldown_hours=0", "drift.min_degradation=0")
    window = write_window(_shifted_texts()[:300], world["root"] / "shifted.jsonl")
    before = {v.version for v in Registry(p).versions()}
    run = _monitor(p, window)
    assert run.succeeded, run.log_file.read_text()[-3000:]
    stages = ledger.collect(p, run.run_id)
    check = stages["drift-check"]
    assert check["metrics"]["retrain"] == 1.0, check["tags"]["decision"]
    assert "no-retrain" not in stages
    # the nested retrain ran on the window and registered a candidate triggered by the drift
    assert {"prepare-data", "train", "gate", "summary"} <= set(stages)
    new = [v for v in Registry(p).versions() if v.version not in before]
    assert len(new) == 1
    assert new[0].tags["trigger_reason"].startswith("drift: ")
    assert "the champion is worse on it: champion " in new[0].tags["trigger_reason"]
    # no forgetting: the retrain read the window plus a replay of the champion's documents
    # (drift.replay_share 0.2), and the gate also compared both models on the
    # champion's own held-out sample
    n = len(_shifted_texts()[:300])
    assert stages["prepare-data"]["metrics"]["docs_read"] == n + replay_count(n, 0.2)
    gate = stages["gate"]["metrics"]
    assert "delta_regression_bits_per_byte_rel" in gate and "delta_regression_ci_low" in gate
    assert new[0].tags["pipeline_run_id"] == run.run_id
    report = run.artifact("drift-check", "report")
    assert report is not None and "<html" in report.read_text()[:2000].lower()


def test_cooldown_blocks_a_second_trigger(world):
    # drift.trigger=distribution: the guard is tested here, not the policy
    p = world["profile"]("drift.cooldown_hours=24", "drift.trigger=distribution")
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
