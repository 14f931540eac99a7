"""How a retrain run ended, from its own ledger; KFP's reported state typed and kept beside it.

The exit handler gets `PipelineTaskFinalStatus.state`: the state of the DAG it guards, as a
string whose words depend on the runner.

- kfp.local: SUCCEEDED or FAILED.
- Kubeflow, v2 driver on MLMD (`backend/src/v2/driver/resolve.go`): the DAG execution's MLMD
  `Execution.State` by name (UNKNOWN, NEW, RUNNING, COMPLETE, FAILED, CACHED, CANCELED), and an
  error that is always empty. Before backend 2.17 a DAG's state propagates one level only, so a
  run that succeeded reports RUNNING; a run whose gate rejected the challenger (the promote
  branch not taken) reports RUNNING on 2.17 too.
- A backend that keeps tasks in its run API: the v2beta1 `RuntimeState` names (PENDING,
  RUNNING, SUCCEEDED, SKIPPED, FAILED, CANCELING, CANCELED, PAUSED).
- The IR's own `PipelineStateEnum.PipelineTaskState` names, which pipeline_spec.proto says the
  field holds (CANCELLED with two Ls, NOT_TRIGGERED, ...).

So the state cannot say how the run ended, and a gated run (a success: the champion stays) is
no state of any runner. The ledger can: a stage records its entry when it succeeds and nothing
when it raises (`flywheel.ledger.stage`), and the exit handler runs after every task it guards
has ended. `derive` reads the outcome from the entries, which is pure and tested case by case;
the reported state decides only what the entries leave open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flywheel import contracts


class Reported(StrEnum):
    """What a reported state string means, whichever runner gave it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    RUNNING = "running"  # not final as recorded: pre-2.17's unpropagated DAG state is one
    PENDING = "pending"
    SKIPPED = "skipped"  # ended without running: a cache hit, a branch not triggered
    UNKNOWN = "unknown"  # a backend's "unspecified", or a word in no table below


# Every state string a runner hands the exit handler -> its meaning. Several runners share a
# word (RUNNING, FAILED, SUCCEEDED); they agree on what it means.
REPORTED_STATES: dict[str, Reported] = {
    # kfp.local (kfp/local/orchestrator): its task status, in these two words only
    "SUCCEEDED": Reported.SUCCEEDED,
    "FAILED": Reported.FAILED,
    # MLMD Execution.State (ml-metadata metadata_store.proto), the v2 driver's source
    "UNKNOWN": Reported.UNKNOWN,
    "NEW": Reported.PENDING,
    "RUNNING": Reported.RUNNING,
    "COMPLETE": Reported.SUCCEEDED,
    "CACHED": Reported.SKIPPED,
    "CANCELED": Reported.CANCELED,
    # KFP API v2beta1 RuntimeState (run.proto), a driver that reads tasks from the API
    "RUNTIME_STATE_UNSPECIFIED": Reported.UNKNOWN,
    "RUNTIMESTATE_UNSPECIFIED": Reported.UNKNOWN,
    "PENDING": Reported.PENDING,
    "SKIPPED": Reported.SKIPPED,
    "CANCELING": Reported.CANCELED,
    "PAUSED": Reported.RUNNING,
    # pipeline_spec.proto PipelineStateEnum.PipelineTaskState
    "TASK_STATE_UNSPECIFIED": Reported.UNKNOWN,
    "QUEUED": Reported.PENDING,
    "RUNNING_DRIVER": Reported.RUNNING,
    "DRIVER_SUCCEEDED": Reported.RUNNING,
    "RUNNING_EXECUTOR": Reported.RUNNING,
    "CANCEL_PENDING": Reported.CANCELED,
    "CANCELLING": Reported.CANCELED,
    "CANCELLED": Reported.CANCELED,
    "NOT_TRIGGERED": Reported.SKIPPED,
    "UNSCHEDULABLE": Reported.SKIPPED,
}


class Outcome(StrEnum):
    """How the run ended, as its ledger shows."""

    SUCCEEDED = "succeeded"  # the challenger won the gate and is champion
    GATED = "gated"  # a successful run whose challenger lost: the champion stays
    FAILED = "failed"  # a stage failed (or the run was stopped) before the run's end
    UNKNOWN = "unknown"  # the ledger and the reported state disagree, or the ledger is empty


@dataclass(frozen=True)
class RunOutcome:
    outcome: Outcome
    reported: str  # the state string KFP handed the exit handler, verbatim
    reported_state: Reported
    reason: str  # one line: the ledger entries the outcome rests on
    failed_task: str | None = None  # the KFP task, when the ledger shows which


def reported_state(state: str) -> Reported:
    """The meaning of a reported state string (any runner's); UNKNOWN when it has none here."""
    return REPORTED_STATES.get(state.strip().upper(), Reported.UNKNOWN)


# A retrain run's stages in DAG order: (ledger entry, the KFP task that records it). The two
# evaluations run side by side after train; tune only when the plan entry says it is enabled.
_ORDER = (
    (contracts.PLAN, contracts.PLAN),
    (contracts.PREPARE_DATA, contracts.PREPARE_DATA),
    (contracts.TUNE, contracts.TUNE),
    (contracts.TRAIN, contracts.TRAIN),
    (contracts.EVALUATE_CHALLENGER, contracts.EVALUATE),
    (contracts.EVALUATE_CHAMPION, contracts.EVALUATE_CHAMPION),
    (contracts.GATE, contracts.GATE),
)


def _first_missing(stages: Mapping[str, Any]) -> str:
    """The KFP task of the first stage, in DAG order, without a ledger entry."""
    plan = stages.get(contracts.PLAN, {}).get("tags", {})
    tuned = plan.get(contracts.PLAN_TUNE_ENABLED) == "True"
    for entry, task in _ORDER:
        if entry == contracts.TUNE and not tuned:
            continue
        if entry not in stages:
            return task
    return contracts.GATE


def _gate_promoted(tags: Mapping[str, str]) -> bool | None:
    """Whether the gate chose to promote: its own tag, else its verdict; None if neither."""
    flag = tags.get(contracts.GATE_PROMOTE)
    if flag in ("True", "False"):
        return flag == "True"
    verdict = tags.get(contracts.VERDICT)
    return None if verdict is None else verdict == "promote"


def derive(stages: Mapping[str, Mapping[str, Any]], state: str) -> RunOutcome:
    """The outcome of one retrain run from its ledger entries (`flywheel.ledger.collect`:
    stage -> {"metrics", "tags"}), and the reported state typed beside it.

    - a promote entry: SUCCEEDED, whatever the state says;
    - a gate entry that chose not to promote: GATED (a successful run);
    - a gate entry that chose to promote, and no promote entry: FAILED in promote;
    - no gate entry: the run ended before its gate. FAILED, naming the first stage without an
      entry, when KFP reports a failure, a cancel, or a state that is not final (RUNNING:
      the exit handler runs after the body ended, so a failure that did not propagate) or
      has no meaning here; UNKNOWN when KFP reports success (the two disagree: the ledger may
      be read from another store or run id) or the ledger holds no entry at all.
    """
    typed = reported_state(state)

    def result(outcome: Outcome, reason: str, failed: str | None = None) -> RunOutcome:
        return RunOutcome(outcome, state, typed, reason, failed)

    promoted = stages.get(contracts.PROMOTE)
    if promoted is not None:
        version = promoted.get("tags", {}).get(contracts.VERSION, "?")
        return result(Outcome.SUCCEEDED, f"promoted version {version} to {contracts.CHAMPION}")
    gate = stages.get(contracts.GATE)
    if gate is not None:
        tags = gate.get("tags", {})
        version = tags.get(contracts.VERSION, "?")
        chose = _gate_promoted(tags)
        if chose is False:
            verdict = tags.get(contracts.VERDICT, "reject")
            return result(
                Outcome.GATED,
                f"the gate kept the champion (verdict: {verdict}); version {version} stays "
                f"{contracts.CHALLENGER}",
            )
        if chose is True:
            return result(
                Outcome.FAILED,
                f"the gate chose to promote version {version} and {contracts.PROMOTE} "
                "recorded nothing",
                contracts.PROMOTE,
            )
        return result(Outcome.UNKNOWN, "the gate's entry does not say whether it promoted")
    if not stages:
        if typed in (Reported.FAILED, Reported.CANCELED):
            return result(Outcome.FAILED, "no stage recorded an entry", contracts.PLAN)
        return result(Outcome.UNKNOWN, "the ledger holds no entry for this run")
    missing = _first_missing(stages)
    if typed in (Reported.SUCCEEDED, Reported.SKIPPED):
        return result(
            Outcome.UNKNOWN,
            f"KFP reports success, but the ledger has no {contracts.GATE} entry (the first "
            f"stage without one: {missing})",
        )
    return result(Outcome.FAILED, f"{missing} recorded no entry: the run ended there", missing)
