"""Stage runners: the library calls behind each KFP component and each CLI stage command.

A component turns artifacts into paths and calls exactly one runner here; `flywheel train`
and friends call the same runners under a `cli-...` run id. A runner is thin: load the
profile (it crossed a process boundary as a dict) and apply the run knobs
(`flywheel.profiles`), call the library, and record one ledger entry (`ledger.stage`). It
returns a typed result. Nothing here imports KFP, so every runner is testable as a plain
function.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from flywheel import contracts, forgetting, ledger
from flywheel.config import Profile, validate_profile
from flywheel.profiles import (
    champion_model_dir,
    load,
    record_source,
    staged_source,
    with_champion_tokenizer,
    with_data_location,
    with_params,
)

if TYPE_CHECKING:
    from flywheel.data.stats import DataStats
    from flywheel.evaluate import EvalReport
    from flywheel.gate import Decision
    from flywheel.outcome import RunOutcome
    from flywheel.progress import Progress
    from flywheel.registry import HistoryEntry
    from flywheel.train.report import TrainResult
    from flywheel.tune.report import TuneResult

# The results of the runners that return more than one library object; the others return
# the library's own result (DataStats, TuneResult, TrainResult, EvalReport, HistoryEntry).


@dataclass(frozen=True)
class PlanResult:
    tune_enabled: bool
    model_name: str


@dataclass(frozen=True)
class GateResult:
    decision: Decision
    version: str  # the registered candidate
    decision_markdown: str
    model_card: str


@dataclass(frozen=True)
class RunSummary:
    markdown: str
    facts: dict[str, Any]
    outcome: RunOutcome


def plan(profile: dict[str, Any], run_id: str) -> PlanResult:
    """Validate the profile once, before any work, and say what this run will do.

    Its ledger entry marks the run as started: the monitor counts a run with a `plan`
    and no `summary` as a retrain in flight. Every service the run needs is reached first
    (`flywheel.preflight`), so an unreachable one fails the run before any work.
    """
    from flywheel import preflight

    p = load(profile)
    with ledger.stage(p, run_id, contracts.PLAN, timed=False) as entry:
        preflight.check(p)
        entry.tags[contracts.PLAN_TUNE_ENABLED] = p.tune.enabled
        entry.tags.update(ledger.driver_tags())  # a local run's driver: is it still going?
    return PlanResult(tune_enabled=p.tune.enabled, model_name=p.registry.model_name)


# ----------------------------------------------------------------------------- stages


def prepare(
    profile: dict[str, Any] | Profile,
    data_location: str,
    out_dir: str | Path,
    run_id: str,
    *,
    progress: Progress | None = None,
    store: bool = False,
    label: str | None = None,
) -> DataStats:
    """The data step; `flywheel data prepare` calls it too, with its progress display,
    `store` (out_dir holds datasets by content hash) and `label` (its flag, for errors)."""
    from flywheel.data import prepare as prepare_data

    p = with_champion_tokenizer(with_data_location(load(profile), data_location))
    with ledger.stage(p, run_id, contracts.PREPARE_DATA) as entry:
        # A retrain on new data also learns from a replay of the champion's documents.
        with source_for_workers(p, bool(data_location)) as local:
            stats = prepare_data(local, Path(out_dir), progress, store=store, label=label)
        record_source(Path(stats.out_dir or out_dir), p.data.source.path)
        entry.metrics.update(stats.metrics())
        entry.tags["content_hash"] = stats.content_hash
    return stats


# The folder a local corpus is uploaded under (inside its hand-off upload, beside the
# upload's completion mark, which is no document).
SOURCE_DIR = "corpus"


@contextlib.contextmanager
def source_for_workers(profile: Profile, new_data: bool) -> Iterator[Profile]:
    """The profile whose `data.source.path` the data stage's Ray tasks can open wherever
    they run. On this machine (ray.mode local, a loopback address): a URI is staged to a
    local copy and the replay mixed in, as before. Where tasks may run on other nodes
    (address elsewhere, kuberay): a URI is read in place by the tasks; a local corpus (or
    one staged here to mix in the replay) is uploaded once under storage.root's hand-off
    (runtime.crossing), and a plain-path storage.root is refused naming it, before Ray starts."""
    from flywheel import storage
    from flywheel.runtime import crossing

    replay = new_data and profile.drift.replay_share > 0
    src = profile.data.source
    base = crossing.handoff_root(profile) if src.kind == "files" else None
    if base is None:
        with staged_source(profile) as staged, forgetting.replayed(staged, new_data) as local:
            yield local
        return
    if storage.is_remote(src.path) and not replay:
        yield profile
        return
    with (
        staged_source(profile) as staged,
        forgetting.replayed(staged, new_data) as local,
        tempfile.TemporaryDirectory(prefix="flywheel-source-") as tmp,
    ):
        corpus, holder = Path(local.data.source.path or ""), Path(tmp) / SOURCE_DIR
        if corpus.is_dir():
            shutil.copytree(corpus, holder)
        else:
            holder.mkdir()
            shutil.copy2(corpus, holder / corpus.name)
        uri = crossing.upload_once(Path(tmp), base, "data", profile.storage.endpoint_url)
        data = local.model_dump()
        data["data"]["source"]["path"] = f"{uri.rstrip('/')}/{SOURCE_DIR}"
        yield validate_profile(data, "the data source handed to the Ray workers")


def tune(
    profile: dict[str, Any] | Profile,
    dataset_dir: str | Path,
    out_dir: str | Path,
    run_id: str,
    *,
    progress: Progress | None = None,
) -> TuneResult:
    """The tune step; `flywheel tune` calls it too, with its progress bar."""
    from flywheel.artifacts import DatasetManifest
    from flywheel.tune import tune as run_study
    from flywheel.tune.space import check_space, dataset_study

    p = load(profile)
    check_space(p)  # a bad search space is the profile's error: said before the data is read
    p = dataset_study(p, DatasetManifest.read(dataset_dir).content_hash)
    # Trials start where the train step will: the champion when the profile warm-starts.
    init_from = champion_model_dir(p)
    with ledger.stage(p, run_id, contracts.TUNE) as entry:
        result = run_study(
            p,
            Path(dataset_dir),
            Path(out_dir),
            init_from=str(init_from) if init_from else None,
            tags={ledger.RUN_TAG: run_id},
            progress=progress,
        )
        entry.metrics.update(result.metrics())
        entry.tags["best_params"] = json.dumps(result.best_params)
    return result


def train(
    profile: dict[str, Any] | Profile,
    dataset_dir: str | Path,
    params: dict[str, Any] | None,
    out_dir: str | Path,
    trigger_reason: str,
    run_id: str,
    *,
    init_from: str | Path | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """The train step; `flywheel train` calls it too, with its progress bar and, from
    --init-from, a model to start from instead of the champion."""
    from flywheel.artifacts import DatasetManifest
    from flywheel.tracking import log_dataset_samples
    from flywheel.train import train as train_model

    p = with_params(load(profile), params)
    with ledger.stage(p, run_id, contracts.TRAIN) as entry:
        if init_from is None:
            init_from = champion_model_dir(p)
        tags = {
            ledger.RUN_TAG: run_id,
            contracts.TAG_TRIGGER_REASON: trigger_reason,
            contracts.TAG_DATA_HASH: DatasetManifest.read(dataset_dir).content_hash,
            contracts.TAG_WARM_START: str(init_from is not None),
        }
        result = train_model(
            p,
            Path(dataset_dir),
            Path(out_dir),
            init_from=str(init_from) if init_from else None,
            tags=tags,
            progress=progress,
            run_key=run_id,  # a retried train step continues from its checkpoints
        )
        if result.mlflow_run_id:
            log_dataset_samples(p, result.mlflow_run_id, Path(dataset_dir))
        entry.metrics.update(result.metrics())
        entry.tags[contracts.TRAINING_RUN_ID] = result.mlflow_run_id or ""
    return result


# Typed per call: a model evaluated always has a report; the champion may be absent.
@overload
def evaluate(
    profile: dict[str, Any] | Profile,
    model: str | Path,
    dataset_dir: str | Path,
    out_json: str | Path | None,
    run_id: str,
) -> EvalReport: ...
@overload
def evaluate(
    profile: dict[str, Any] | Profile,
    model: None,
    dataset_dir: str | Path,
    out_json: str | Path | None,
    run_id: str,
) -> EvalReport | None: ...
def evaluate(
    profile: dict[str, Any] | Profile,
    model: str | Path | None,
    dataset_dir: str | Path,
    out_json: str | Path | None,
    run_id: str,
) -> EvalReport | None:
    """Evaluate a model dir, or the registry champion when `model` is None.

    Writes the report as JSON (or `{"absent": true}` when there is no champion) and returns
    the report or None. `flywheel evaluate` passes no `out_json` (it saves the report where
    --out says, making the directories) and a Profile.
    """
    from flywheel.artifacts import write_absent
    from flywheel.evaluate import evaluate as evaluate_model

    p = load(profile)
    stage = contracts.EVALUATE_CHAMPION if model is None else contracts.EVALUATE_CHALLENGER
    with ledger.stage(p, run_id, stage) as entry:
        if model is None:
            from flywheel.registry import Registry

            model = Registry(p).champion_uri()
            if model is None:
                if out_json is not None:
                    write_absent(out_json)
                entry.tags["absent"] = True
                return None
        report = evaluate_model(p, model, Path(dataset_dir))
        if out_json is not None:
            Path(out_json).write_text(report.model_dump_json(indent=2))
        entry.metrics.update(report.metrics(""))
    return report


def gate(
    profile: dict[str, Any],
    challenger_json: str | Path,
    champion_json: str | Path,
    model_dir: str | Path,
    dataset_dir: str | Path,
    train_run_id: str,
    trigger_reason: str,
    run_id: str,
) -> GateResult:
    """Decide (pure), then register the candidate with its lineage and verdict."""
    from flywheel.artifacts import DatasetManifest, load_unless_absent
    from flywheel.evaluate import EvalReport
    from flywheel.gate import decide_promotion
    from flywheel.registry import Registry, lineage_tags, model_card

    p = load(profile)
    with ledger.stage(p, run_id, contracts.GATE) as entry:
        challenger = load_unless_absent(EvalReport, challenger_json)
        if challenger is None:
            raise ValueError(f"{challenger_json}: the challenger has no evaluation report")
        champion = load_unless_absent(EvalReport, champion_json)
        # Both models on the champion's own held-out sample too: no forgetting (rule 8).
        regression = forgetting.regression_reports(p, Path(model_dir)) if champion else None
        decision = decide_promotion(challenger, champion, p.gate, regression)
        decision_md = decision.to_markdown(challenger, champion)
        manifest = DatasetManifest.read(dataset_dir)
        card = model_card(
            p, Path(model_dir), manifest.model_dump(mode="json"), challenger, decision, champion
        )
        tags = lineage_tags(
            data_hash=manifest.content_hash,
            training_run_id=train_run_id,
            pipeline_run_id=run_id,
            trigger_reason=trigger_reason,
            report=challenger,
            decision=decision,
        )
        registry = Registry(p)
        version = registry.register_candidate(
            Path(model_dir),
            tags=tags,
            model_card=card,
            run_id=train_run_id or None,
            data_format=manifest.format,  # SFT models serve chat turns
        )
        entry.metrics.update(
            {
                **challenger.metrics(contracts.CHALLENGER_PREFIX),
                **(champion.metrics(contracts.CHAMPION_PREFIX) if champion else {}),
                # The paired difference the decision rests on (bits per byte, its interval).
                **{f"{contracts.DELTA_PREFIX}{k}": v for k, v in decision.deltas.items()},
            }
        )
        entry.tags.update(
            {
                contracts.VERDICT: decision.verdict,
                contracts.GATE_PROMOTE: decision.promote,
                contracts.VERSION: version,
            }
        )
    return GateResult(decision, version, decision_md, card)


def promote(profile: dict[str, Any], version: str, reason: str, run_id: str) -> HistoryEntry | None:
    from flywheel.registry import Registry

    p = load(profile)
    with ledger.stage(p, run_id, contracts.PROMOTE) as entry:
        moved = Registry(p).promote(version, reason=reason, actor=f"pipeline:{run_id}")
        entry.tags.update({contracts.VERSION: version, "alias": contracts.CHAMPION})
    return moved


def summarize(profile: dict[str, Any], run_id: str, state: str, error: str) -> RunSummary:
    """The exit handler's summary (Markdown + the facts), also recorded in the ledger.

    `state` is `PipelineTaskFinalStatus.state` as KFP handed it; the outcome (succeeded, gated,
    failed, unknown) is read from this run's ledger (`flywheel.outcome`), and the state is
    kept beside it, verbatim: which words it holds depends on the runner and the backend.
    """
    from flywheel import outcome, summary

    p = load(profile)
    stages = ledger.collect(p, run_id)
    result = outcome.derive(stages, state)
    facts = {**summary.facts_from(stages, run_id), **summary.outcome_facts(result, error)}
    with ledger.stage(p, run_id, contracts.SUMMARY, timed=False) as entry:
        entry.tags[contracts.SUMMARY_OUTCOME] = result.outcome.value
        entry.tags[contracts.SUMMARY_REPORTED_STATE] = state
        if result.failed_task:
            entry.tags[contracts.SUMMARY_FAILED_TASK] = result.failed_task
    return RunSummary(summary.markdown(run_id, facts), facts, result)


# ---------------------------------------------------------------------------- monitor


def drift_check(profile: dict[str, Any], window: str, out_dir: Path, run_id: str):
    """The monitor's check of one window (flywheel.monitor.check), recorded in the ledger.

    Returns a MonitorCheck (drift, the champion's degradation, the decision). Bad input
    raises a DataError before the champion is looked up, and nothing is recorded.
    """
    from flywheel import monitor

    p = load(profile)
    with ledger.stage(p, run_id, contracts.DRIFT_CHECK) as entry:
        result = monitor.check(p, window, Path(out_dir), run_id)
        entry.metrics.update(result.metrics())
        entry.tags.update(decision=result.decision.reason, window=result.window)
    return result


def record_no_retrain(profile: dict[str, Any], run_id: str) -> str:
    """Record why this monitor run started no retrain (the drift check's decision)."""
    p = load(profile)
    checked = ledger.collect(p, run_id).get(contracts.DRIFT_CHECK, {})
    decision = checked.get("tags", {}).get("decision", "")
    with ledger.stage(p, run_id, contracts.NO_RETRAIN, timed=False) as entry:
        entry.tags["reason"] = decision
    return decision
