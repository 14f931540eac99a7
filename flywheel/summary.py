"""The run summary: what one pipeline run did, read back from the run ledger, as facts
and as the Markdown the exit handler shows (no side effects here; the runner records)."""

from __future__ import annotations

from typing import Any

from flywheel import ledger
from flywheel.config import Profile

# Facts that are not table rows: the state and error have their own lines, and the
# per-stage seconds are a nested mapping (read by `flywheel run` and the benchmarks).
_NOT_ROWS = ("state", "error", "stage_seconds")


def run_facts(profile: Profile, run_id: str) -> dict[str, Any]:
    """What one pipeline run did, read back from the ledger."""
    stages = ledger.collect(profile, run_id)
    facts: dict[str, Any] = {"pipeline_run_id": run_id}
    prep = stages.get("prepare-data", {}).get("metrics", {})
    for key in ("docs_read", "docs_kept", "docs_rejected", "tokens_train"):
        if key in prep:
            facts[key] = int(prep[key])
    trained = stages.get("train", {}).get("metrics", {})
    for key in ("first_loss", "final_loss", "tokens_per_s"):
        if key in trained:
            facts[key] = round(trained[key], 4)
    gated = stages.get("gate", {})
    for key, digits in (
        ("challenger_bits_per_byte", 4),
        ("champion_bits_per_byte", 4),
        ("delta_bits_per_byte_paired_abs", 4),
        ("delta_bits_per_byte_ci_low", 4),
        ("delta_bits_per_byte_ci_high", 4),
        ("challenger_perplexity", 3),
        ("champion_perplexity", 3),
    ):
        if key in gated.get("metrics", {}):
            facts[key.removeprefix("delta_")] = round(gated["metrics"][key], digits)
    for key in ("verdict", "version"):
        if key in gated.get("tags", {}):
            facts[key] = gated["tags"][key]
    if gated:
        facts["alias"] = "champion" if "promote" in stages else "challenger"
    facts["stage_seconds"] = {
        stage: round(entry["metrics"]["stage_seconds"], 2)
        for stage, entry in stages.items()
        if "stage_seconds" in entry.get("metrics", {})
    }
    return facts


def markdown(run_id: str, facts: dict[str, Any]) -> str:
    """The summary page: the state, the error when there is one, then one row per fact."""
    lines = [f"# Run summary: {run_id}", "", f"**State:** {facts.get('state', '')}", ""]
    if facts.get("error"):
        lines += [f"**Error:** {facts['error']}", ""]
    lines += ["| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items() if k not in _NOT_ROWS]
    return "\n".join(lines) + "\n"
