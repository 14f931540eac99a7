"""The run's outcome from its ledger, and KFP's reported state typed beside it: every word a
runner can hand the exit handler, and the outcome case by case (pure, no MLflow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flywheel import contracts
from flywheel.outcome import REPORTED_STATES, Outcome, Reported, derive, reported_state
from flywheel.summary import markdown, outcome_facts


def _entry(**tags) -> dict:
    return {"metrics": {}, "tags": {k: str(v) for k, v in tags.items()}}


def _ledger(*, tune: bool = False, through: str | None = None, **extra) -> dict:
    """A retrain run's entries in DAG order up to and including `through` (None: none)."""
    order = [
        (contracts.PLAN, _entry(**{contracts.PLAN_TUNE_ENABLED: tune})),
        (contracts.PREPARE_DATA, _entry(content_hash="abc")),
        *([(contracts.TUNE, _entry())] if tune else []),
        (contracts.TRAIN, _entry(training_run_id="r1")),
        (contracts.EVALUATE_CHALLENGER, _entry()),
        (contracts.EVALUATE_CHAMPION, _entry()),
    ]
    out: dict = {}
    for name, entry in order:
        if through is None:
            break
        out[name] = entry
        if name == through:
            break
    return {**out, **extra}


def _gate(promote: bool, version: str = "3") -> dict:
    return _entry(
        **{
            contracts.VERDICT: "promote" if promote else "reject",
            contracts.GATE_PROMOTE: promote,
            contracts.VERSION: version,
        }
    )


PROMOTED = _ledger(
    through=contracts.EVALUATE_CHAMPION,
    **{
        contracts.GATE: _gate(True),
        contracts.PROMOTE: _entry(**{contracts.VERSION: "3", "alias": "champion"}),
    },
)
GATED = _ledger(through=contracts.EVALUATE_CHAMPION, **{contracts.GATE: _gate(False)})

# ------------------------------------------------------------------ the reported states

# ml-metadata's Execution.State (metadata_store.proto), what the MLMD-backed v2 driver reads
# (`GetLastKnownState().String()` in backend/src/v2/driver/resolve.go).
MLMD_STATES = {
    "UNKNOWN": Reported.UNKNOWN,
    "NEW": Reported.PENDING,
    "RUNNING": Reported.RUNNING,
    "COMPLETE": Reported.SUCCEEDED,
    "FAILED": Reported.FAILED,
    "CACHED": Reported.SKIPPED,
    "CANCELED": Reported.CANCELED,
}


def test_mlmd_execution_states_have_their_meaning():
    assert {word: reported_state(word) for word in MLMD_STATES} == MLMD_STATES


def test_kfp_local_words_are_known():
    """kfp.local hands the exit task its orchestrator's task status: these two words only."""
    import kfp.local

    source = "".join(
        p.read_text() for p in (Path(kfp.local.__file__).parent / "orchestrator").glob("*.py")
    )
    words = set(re.findall(r"'(SUCCEEDED|FAILED|CANCEL\w*|RUNNING|SKIPPED|PENDING)'", source))
    assert words == {"SUCCEEDED", "FAILED"}
    assert reported_state("SUCCEEDED") is Reported.SUCCEEDED
    assert reported_state("FAILED") is Reported.FAILED


def test_every_ir_task_state_is_known(contracts_dir):
    """pipeline_spec.proto says the field holds a PipelineStateEnum.PipelineTaskState name."""
    for proto in sorted((contracts_dir / "kfp-protos").glob("*/pipeline_spec.proto")):
        body = proto.read_text().split("enum PipelineTaskState {", 1)[1].split("}", 1)[0]
        names = re.findall(r"^\s*([A-Z_]+)\s*=\s*\d+;", body, flags=re.M)
        assert len(names) >= 10, proto
        assert set(names) <= set(REPORTED_STATES), f"{proto}: {set(names) - set(REPORTED_STATES)}"


def test_every_api_runtime_state_is_known(contracts_dir):
    """A backend that reads tasks from its run API reports v2beta1 RuntimeState names."""
    spec = json.loads((contracts_dir / "kfp-api-v2beta1" / "run.swagger.json").read_text())
    names = spec["definitions"]["v2beta1RuntimeState"]["enum"]
    assert set(names) <= set(REPORTED_STATES), set(names) - set(REPORTED_STATES)
    assert reported_state("SUCCEEDED") is Reported.SUCCEEDED
    assert reported_state("CANCELING") is Reported.CANCELED


def test_a_state_string_is_read_leniently_and_an_unknown_one_means_unknown():
    assert reported_state(" complete\n") is Reported.SUCCEEDED
    assert reported_state("") is Reported.UNKNOWN
    assert reported_state("EXPLODED") is Reported.UNKNOWN


# ------------------------------------------------------------------ outcomes


def test_complete_with_a_promote_entry_succeeded():
    result = derive(PROMOTED, "COMPLETE")
    assert result.outcome is Outcome.SUCCEEDED and result.failed_task is None
    assert (result.reported, result.reported_state) == ("COMPLETE", Reported.SUCCEEDED)
    assert "promoted version 3" in result.reason


def test_running_before_backend_2_17_with_gate_and_promote_entries_succeeded():
    """A DAG's state propagates one level before 2.17: a successful run reports RUNNING."""
    result = derive(PROMOTED, "RUNNING")
    assert result.outcome is Outcome.SUCCEEDED
    assert (result.reported, result.reported_state) == ("RUNNING", Reported.RUNNING)


def test_running_with_the_gate_rejecting_is_a_gated_success():
    result = derive(GATED, "RUNNING")
    assert result.outcome is Outcome.GATED and result.failed_task is None
    assert "verdict: reject" in result.reason and "version 3 stays challenger" in result.reason


def test_gated_whatever_the_runner_says():
    for state in ("SUCCEEDED", "COMPLETE", "RUNNING", "FAILED"):
        assert derive(GATED, state).outcome is Outcome.GATED, state
    # an older gate entry without its promote tag: the verdict says the same
    old = {**GATED, contracts.GATE: _entry(verdict="reject", version="3")}
    assert derive(old, "COMPLETE").outcome is Outcome.GATED


@pytest.mark.parametrize(
    "stages, failed",
    [
        (_ledger(through=contracts.PREPARE_DATA), contracts.TRAIN),
        (_ledger(tune=True, through=contracts.PREPARE_DATA), contracts.TUNE),
        (_ledger(through=contracts.TRAIN), contracts.EVALUATE),  # the challenger's task
        (
            {
                **_ledger(through=contracts.TRAIN),
                contracts.EVALUATE_CHALLENGER: _entry(),
            },
            contracts.EVALUATE_CHAMPION,
        ),
        (_ledger(through=contracts.EVALUATE_CHAMPION), contracts.GATE),
        (_ledger(through=contracts.PLAN), contracts.PREPARE_DATA),
        ({}, contracts.PLAN),
    ],
)
def test_failed_names_the_task_the_ledger_stops_at(stages, failed):
    result = derive(stages, "FAILED")
    assert result.outcome is Outcome.FAILED
    assert result.failed_task == failed
    assert result.reported_state is Reported.FAILED


def test_a_gate_that_chose_to_promote_without_a_promote_entry_failed_in_promote():
    stages = _ledger(through=contracts.EVALUATE_CHAMPION, **{contracts.GATE: _gate(True)})
    for state in ("FAILED", "RUNNING", "COMPLETE"):
        result = derive(stages, state)
        assert (result.outcome, result.failed_task) == (Outcome.FAILED, contracts.PROMOTE)


def test_a_failure_that_did_not_propagate_is_still_a_failure():
    """The exit handler runs after the body ended: RUNNING without a gate entry failed."""
    for state in ("RUNNING", "CANCELED", "CANCELLED", "NEW"):
        result = derive(_ledger(through=contracts.PREPARE_DATA), state)
        assert (result.outcome, result.failed_task) == (Outcome.FAILED, contracts.TRAIN), state


def test_kfp_local_succeeded():
    result = derive(PROMOTED, "SUCCEEDED")
    assert (result.outcome, result.reported_state) == (Outcome.SUCCEEDED, Reported.SUCCEEDED)
    assert derive(GATED, "SUCCEEDED").outcome is Outcome.GATED
    failed = derive(_ledger(through=contracts.TRAIN), "FAILED")
    assert (failed.outcome, failed.failed_task) == (Outcome.FAILED, contracts.EVALUATE)


def test_an_unknown_state_string_is_kept_as_is_and_the_ledger_decides():
    for stages, outcome in (
        (PROMOTED, Outcome.SUCCEEDED),
        (GATED, Outcome.GATED),
        (_ledger(through=contracts.TRAIN), Outcome.FAILED),
    ):
        result = derive(stages, "EXPLODED")
        assert result.reported == "EXPLODED" and result.reported_state is Reported.UNKNOWN
        assert result.outcome is outcome


def test_success_reported_without_a_gate_entry_is_unknown_not_a_guess():
    """The ledger and KFP disagree (entries read from another store or run id?): say so."""
    result = derive(_ledger(through=contracts.TRAIN), "COMPLETE")
    assert result.outcome is Outcome.UNKNOWN and "no gate entry" in result.reason
    assert derive({}, "SUCCEEDED").outcome is Outcome.UNKNOWN
    assert derive({}, "RUNNING").outcome is Outcome.UNKNOWN


# ------------------------------------------------------------------ the summary page


def test_the_summary_shows_the_outcome_and_the_state_as_reported_by_kfp():
    text = markdown("run-1", outcome_facts(derive(GATED, "RUNNING")))
    assert "**Outcome:** gated: the gate kept the champion" in text
    assert "(as reported by KFP: RUNNING)" in text
    failed = markdown(
        "run-2", outcome_facts(derive(_ledger(through=contracts.TRAIN), "FAILED"), "boom")
    )
    assert "**Outcome:** failed" in failed and "(as reported by KFP: FAILED)" in failed
    assert "**Failed task:** evaluate" in failed and "**Error:** boom" in failed
    # the outcome's own lines are not repeated as table rows
    assert "| outcome |" not in failed and "| reported_state |" not in failed
