"""The registry's pure core without MLflow: the alias-move protocol (`plan_move`), the
append-only history read back from tags, and the lineage tags of a candidate."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from flywheel.errors import RegistryError
from flywheel.registry import HISTORY_PREFIX, HistoryEntry, lineage_tags, plan_move, read_history
from flywheel.registry.lineage import TAG_REGISTERED_BY, candidate_identity

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LINEAGE = {TAG_REGISTERED_BY: "flywheel"}


def _entry(seq: int, kind: str, frm: str | None, to: str) -> HistoryEntry:
    fields = {"from": frm, "to": to}
    return HistoryEntry(seq=seq, time=NOW, actor="a", kind=kind, reason="r", **fields)


def _plan(**kw):
    args = dict(
        name="m", kind="promotion", reason="won", actor="ci", current=None, history=[],
        to="1", to_tags=LINEAGE, now=NOW,
    )  # fmt: skip
    return plan_move(**{**args, **kw})


def test_first_move_starts_the_history_and_tags_the_target():
    plan = _plan()
    assert plan is not None
    e = plan.entry
    assert (e.seq, e.kind, e.from_version, e.to_version, e.actor) == (
        1,
        "promotion",
        None,
        "1",
        "ci",
    )
    assert e.key == f"{HISTORY_PREFIX}00000001"
    assert plan.version_tags == {
        "flywheel.promoted_at": NOW.isoformat(),
        "flywheel.promoted_by": "ci",
        "flywheel.promotion_kind": "promotion",
        "flywheel.promotion_reason": "won",
    }


def test_a_move_continues_the_sequence_from_the_current_champion():
    history = [_entry(1, "promotion", None, "1"), _entry(2, "manual", "1", "2")]
    plan = _plan(kind="rollback", current="2", history=history, to="1", reason="bad")
    assert plan is not None
    assert (plan.entry.seq, plan.entry.from_version, plan.entry.to_version) == (3, "2", "1")
    assert plan.entry.kind == "rollback"


def test_promoting_the_champion_is_no_move_but_rolling_back_onto_it_is_refused():
    assert _plan(current="4", to="4") is None
    assert _plan(kind="manual", current="4", to="4") is None
    with pytest.raises(RegistryError, match="already the champion"):
        _plan(kind="rollback", current="4", to="4")


def test_refusals_come_before_anything_is_planned():
    with pytest.raises(RegistryError, match="reason is required"):
        _plan(reason="  ")
    with pytest.raises(RegistryError, match="no flywheel lineage"):
        _plan(to_tags={})
    # Even the no-op needs flywheel's lineage: a foreign champion is not silently accepted.
    with pytest.raises(RegistryError, match="no flywheel lineage"):
        _plan(current="4", to="4", to_tags={TAG_REGISTERED_BY: "someone-else"})


def test_long_reasons_are_clipped_for_the_tag_store():
    plan = _plan(reason="x" * 5000)
    assert plan is not None and len(plan.entry.reason) <= 2000
    assert plan.entry.reason.endswith("(truncated)")


def test_history_is_read_back_in_sequence_order_skipping_unreadable_tags():
    entries = [_entry(2, "promotion", "1", "2"), _entry(1, "promotion", None, "1")]
    tags = {e.key: e.to_tag() for e in entries}
    tags[f"{HISTORY_PREFIX}00000003"] = "{not json"
    tags["unrelated"] = "x"
    assert [e.seq for e in read_history(tags)] == [1, 2]
    assert read_history(tags)[0] == entries[1]  # round-trips through the tag


def test_candidate_identity_needs_both_runs():
    assert candidate_identity(lineage_tags(training_run_id="t", pipeline_run_id="p")) == {
        "pipeline_run_id": "p",
        "training_run_id": "t",
    }
    assert candidate_identity(lineage_tags(training_run_id="t")) is None
    assert candidate_identity(lineage_tags(pipeline_run_id="p", data_hash="h")) is None
