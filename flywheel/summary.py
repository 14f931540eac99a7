"""The run summary: what one pipeline run did, read back from the run ledger, as facts
and as the Markdown the exit handler shows (no side effects here; the runner records)."""

from __future__ import annotations

from typing import Any

from flywheel import contracts, ledger
from flywheel.config import Profile

# Facts that are not table rows: the state and error have their own lines, and the
# per-stage seconds are a nested mapping (read by `flywheel run` and the benchmarks).
_NOT_ROWS = ("state", "error", contracts.STAGE_SECONDS)


def run_facts(profile: Profile, run_id: str) -> dict[str, Any]:
    """What one pipeline run did, read back from the ledger."""
    stages = ledger.collect(profile, run_id)
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
    """The summary page: the state, the error when there is one, then one row per fact."""
    lines = [f"# Run summary: {run_id}", "", f"**State:** {facts.get('state', '')}", ""]
    if facts.get("error"):
        lines += [f"**Error:** {facts['error']}", ""]
    lines += ["| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items() if k not in _NOT_ROWS]
    return "\n".join(lines) + "\n"
