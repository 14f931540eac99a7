"""The run summary: what one pipeline run did, read back from the run ledger, as facts
and as the Markdown the exit handler shows (no side effects here; the runner records)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flywheel import contracts, ledger
from flywheel.config import Profile
from flywheel.outcome import Outcome, RunOutcome

# The outcome's one-line reason, among the facts for the Markdown (not a ledger tag).
OUTCOME_REASON = "outcome_reason"
# Facts that are not table rows: the outcome, the reported state, the failed task and the
# error have their own lines, and the per-stage seconds are a nested mapping (read by
# `flywheel run` and the benchmarks).
_NOT_ROWS = (
    contracts.SUMMARY_OUTCOME,
    contracts.SUMMARY_REPORTED_STATE,
    contracts.SUMMARY_FAILED_TASK,
    OUTCOME_REASON,
    "error",
    contracts.STAGE_SECONDS,
)


def run_facts(profile: Profile, run_id: str) -> dict[str, Any]:
    """What one pipeline run did, read back from the ledger."""
    return facts_from(ledger.collect(profile, run_id), run_id)


def outcome_facts(result: RunOutcome, error: str = "") -> dict[str, Any]:
    """The outcome, KFP's state beside it, the failed task and the error, as facts."""
    facts: dict[str, Any] = {
        contracts.SUMMARY_OUTCOME: result.outcome.value,
        contracts.SUMMARY_REPORTED_STATE: result.reported,
        OUTCOME_REASON: result.reason,
    }
    if result.failed_task:
        facts[contracts.SUMMARY_FAILED_TASK] = result.failed_task
    if error:
        facts["error"] = error
    return facts


def facts_from(stages: Mapping[str, Mapping[str, Any]], run_id: str) -> dict[str, Any]:
    """What one pipeline run did, from its ledger entries (`ledger.collect`)."""
    facts: dict[str, Any] = {"pipeline_run_id": run_id}
    prep = stages.get(contracts.PREPARE_DATA, {}).get("metrics", {})
    for key in ("docs_read", "docs_kept", "docs_rejected", "tokens_train"):
        if key in prep:
            facts[key] = int(prep[key])
    trained = stages.get(contracts.TRAIN, {}).get("metrics", {})
    for key in ("first_loss", "final_loss", "tokens_per_s"):
        if key in trained:
            facts[key] = round(trained[key], 4)
    gated = stages.get(contracts.GATE, {})
    delta = contracts.DELTA_PREFIX
    for key, digits in (
        (contracts.CHALLENGER_BITS_PER_BYTE, 4),
        (contracts.CHAMPION_BITS_PER_BYTE, 4),
        (f"{delta}bits_per_byte_paired_abs", 4),
        (f"{delta}bits_per_byte_ci_low", 4),
        (f"{delta}bits_per_byte_ci_high", 4),
        (contracts.CHALLENGER_PERPLEXITY, 3),
        (contracts.CHAMPION_PERPLEXITY, 3),
    ):
        if key in gated.get("metrics", {}):
            facts[key.removeprefix(delta)] = round(gated["metrics"][key], digits)
    for key in (contracts.VERDICT, contracts.VERSION):
        if key in gated.get("tags", {}):
            facts[key] = gated["tags"][key]
    if gated:
        promoted = contracts.PROMOTE in stages
        facts["alias"] = contracts.CHAMPION if promoted else contracts.CHALLENGER
    seconds = contracts.STAGE_SECONDS
    facts[seconds] = {
        stage: round(entry["metrics"][seconds], 2)
        for stage, entry in stages.items()
        if seconds in entry.get("metrics", {})
    }
    return facts


def markdown(run_id: str, facts: dict[str, Any]) -> str:
    """The summary page: the outcome (from the ledger) with the state KFP reported beside it,
    the failed task and the error when there are some, then one row per fact."""
    outcome = facts.get(contracts.SUMMARY_OUTCOME, Outcome.UNKNOWN.value)
    reason = facts.get(OUTCOME_REASON)
    state = facts.get(contracts.SUMMARY_REPORTED_STATE) or "(nothing)"
    head = f"**Outcome:** {outcome}" + (f": {reason}" if reason else "")
    lines = [f"# Run summary: {run_id}", "", f"{head} (as reported by KFP: {state})", ""]
    if facts.get(contracts.SUMMARY_FAILED_TASK):
        lines += [f"**Failed task:** {facts[contracts.SUMMARY_FAILED_TASK]}", ""]
    if facts.get("error"):
        lines += [f"**Error:** {facts['error']}", ""]
    lines += ["| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items() if k not in _NOT_ROWS]
    return "\n".join(lines) + "\n"
