"""The stage runners' typed results and ledger entries, on a real local MLflow store in a
temporary state directory (no KFP, no Ray: the runners that need neither)."""

from __future__ import annotations

import json

from flywheel import artifacts, ledger, stages
from flywheel.config import Profile
from flywheel.evaluate import EvalReport


def test_plan_returns_its_result_and_marks_the_run_started(state_dir):
    p = Profile()
    result = stages.plan(p.to_param(), "run-1")
    assert result == stages.PlanResult(p.tune.enabled, p.registry.model_name)
    entry = ledger.collect(p, "run-1")["plan"]
    assert entry["tags"]["tune_enabled"] == str(p.tune.enabled)
    assert "stage_seconds" not in entry["metrics"]


def test_evaluating_an_absent_champion_writes_the_sentinel_and_records_it(state_dir, tmp_path):
    p = Profile()
    out = tmp_path / "champion.json"
    assert stages.evaluate(p.to_param(), None, tmp_path / "no-dataset", out, "run-1") is None
    assert json.loads(out.read_text()) == {"absent": True}
    assert artifacts.load_unless_absent(EvalReport, out) is None
    entry = ledger.collect(p, "run-1")["evaluate-champion"]
    assert entry["tags"]["absent"] == "True" and "stage_seconds" in entry["metrics"]


def test_summarize_returns_the_markdown_and_facts_and_records_the_outcome(state_dir):
    p = Profile()
    ledger.record(p, "run-1", "gate", {"challenger_perplexity": 12.3456}, {"verdict": "reject"})
    summary = stages.summarize(p.to_param(), "run-1", "FAILED", "boom")
    assert isinstance(summary, stages.RunSummary)
    assert summary.facts["challenger_perplexity"] == 12.346
    # the gate rejected the challenger: a gated success, whatever the runner reported
    assert summary.outcome.outcome == "gated"
    assert summary.facts["outcome"] == "gated" and summary.facts["reported_state"] == "FAILED"
    assert summary.facts["error"] == "boom"
    assert "| verdict | reject |" in summary.markdown and "**Error:** boom" in summary.markdown
    assert "(as reported by KFP: FAILED)" in summary.markdown
    tags = ledger.collect(p, "run-1")["summary"]["tags"]
    assert (tags["outcome"], tags["reported_state"]) == ("gated", "FAILED")
    assert "failed_task" not in tags


def test_summarize_names_the_task_the_ledger_stops_at(state_dir):
    p = Profile()
    stages.plan(p.to_param(), "run-2")  # tune_enabled is recorded here
    summary = stages.summarize(p.to_param(), "run-2", "RUNNING", "")
    tags = ledger.collect(p, "run-2")["summary"]["tags"]
    assert summary.outcome.failed_task == tags["failed_task"] == "prepare-data"
    assert (tags["outcome"], tags["reported_state"]) == ("failed", "RUNNING")
    assert "**Failed task:** prepare-data" in summary.markdown
