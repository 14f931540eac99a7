"""The monitor's decision: retrain now, or not, and why.

`decide_retrain` is pure and tested case by case. Its inputs are gathered by thin
adapters: the drift result (flywheel.drift), the champion's bits per byte on the window
against its own held-out data (flywheel.degradation), the time of the last model event
(the registry's alias history and version creation times), and whether a retrain is in
flight (the run ledger: a run that started and has not written its summary). `check`
runs them in order for one window; the pipeline's drift-check step and the CLI call it.

The policy (`drift.trigger`): a retrain is worth its cost only when it can help, that is
when the champion is worse on what production sends it now. Distribution drift alone
fires on text the champion already models well (a narrower slice of its own source), so
the default asks for both: the data moved, and the champion's bits per byte on it is
significantly higher than on its held-out data, by at least `drift.min_degradation`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flywheel import contracts, ledger
from flywheel.config import Profile
from flywheel.errors import ConfigError, DataError

if TYPE_CHECKING:
    from flywheel.degradation import PerformanceDrift
    from flywheel.drift import DriftResult

log = logging.getLogger(__name__)

# A retrain that started this long ago without a summary is presumed dead (its pod was
# evicted, the machine rebooted) and no longer blocks the monitor.
STALE_RUN_S = 6 * 3600

Trigger = Literal["distribution", "performance", "both"]


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    # False: a signal the trigger needs could not be measured on this window (too few rows,
    # a NaN statistic). Never read as "no drift" or "not worse": `check` raises on it.
    decided: bool = True


CANNOT_DECIDE = "cannot decide"


def _performance_text(performance: PerformanceDrift | None, min_degradation: float) -> str:
    if performance is None:
        return "champion's bits per byte not measured"
    return f"{performance.describe()}; drift.min_degradation {min_degradation:+.1%}"


def decide_retrain(
    *,
    trigger: Trigger,
    drifted: bool | None,
    drift_reason: str,
    performance: PerformanceDrift | None,
    min_degradation: float,
    now: float,
    last_event: float | None,
    cooldown_s: float,
    in_flight: list[str],
) -> RetrainDecision:
    """Retrain when the policy's trigger fires, outside the cooldown, and with no retrain
    already running. The reason names the numbers behind each part of the verdict.

    `drifted` None, or a measured `performance` that is not `decided`, is a signal that
    could not be measured: when the trigger needs it to decide (under `both`, a decided
    "no" of the other signal is enough), the decision is not decided, never a "no"."""
    degraded = performance is not None and performance.degraded(min_degradation)
    perf = _performance_text(performance, min_degradation)
    perf_known = performance is None or performance.decided
    drift_no, perf_no = drifted is False, perf_known and not degraded
    needed = {
        "distribution": [("drift", drifted is not None)],
        "performance": [("performance", perf_known)],
        "both": []
        if drift_no or perf_no
        else [("drift", drifted is not None), ("performance", perf_known)],
    }[trigger]
    unknown = [name for name, known in needed if not known]
    if unknown:
        return RetrainDecision(
            False, f"{CANNOT_DECIDE} ({' and '.join(unknown)}): {drift_reason}; {perf}", False
        )
    if trigger == "distribution":
        fired, why = drifted, f"{drift_reason}; {perf}"
    elif trigger == "performance":
        fired = degraded
        verdict = "champion worse on the window" if degraded else "champion not worse"
        why = f"{verdict}: {perf}; {drift_reason}"
    elif drifted is None:  # only reached when the champion is, decidedly, not worse
        fired, why = False, f"the champion is not significantly worse: {perf}; {drift_reason}"
    elif not drifted:
        fired, why = False, f"{drift_reason}; {perf}"
    elif degraded:
        fired, why = True, f"{drift_reason} and the champion is worse on it: {perf}"
    else:
        fired = False
        why = f"{drift_reason}, but the champion is not significantly worse on it: {perf}"
    if not fired:
        return RetrainDecision(False, why)
    if in_flight:
        return RetrainDecision(False, f"{why}; retrain already in flight: {', '.join(in_flight)}")
    if last_event is not None and now - last_event < cooldown_s:
        left = (cooldown_s - (now - last_event)) / 3600
        return RetrainDecision(False, f"{why}; inside cooldown ({left:.1f} h left)")
    return RetrainDecision(True, why)


@dataclass(frozen=True)
class MonitorCheck:
    """One window checked: distribution drift, the champion's degradation, the decision."""

    window: str
    drift: DriftResult
    performance: PerformanceDrift | None
    decision: RetrainDecision

    @property
    def report_html(self) -> Path | None:
        return self.drift.report_html

    def metrics(self) -> dict[str, float]:
        perf = self.performance.metrics() if self.performance else {}
        return {**self.drift.metrics(), **perf, "retrain": float(self.decision.retrain)}


def check(profile: Profile, window: str, out_dir: Path, run_id: str) -> MonitorCheck:
    """Check one production window against the champion and decide whether to retrain.

    Bad input (empty window, too few rows) raises a DataError before the champion is
    looked up: a bad window is the user's to fix and must not hide behind the registry's
    state ("no champion").
    """
    from flywheel import degradation
    from flywheel.drift import check_drift, load_window

    window = window or profile.drift.window or ""
    if not window:
        raise ConfigError("no production window: pass --window or set drift.window in the profile")
    out_dir = Path(out_dir)
    current = load_window(window, profile.drift, profile.storage.endpoint_url, now=now())
    champ = champion_reference(profile, out_dir / "reference")
    result = check_drift(profile, current, champ.reference, champ.model_dir, out_dir)
    perf = degradation.measure(
        profile,
        champ.model_dir,
        current["text"].tolist(),
        read_texts(champ.heldout or champ.reference),
        "held-out" if champ.heldout else "training sample",
    )
    t = now()
    decision = decide_retrain(
        trigger=profile.drift.trigger,
        drifted=result.drifted if result.decided else None,
        drift_reason=result.reason,
        performance=perf,
        min_degradation=profile.drift.min_degradation,
        now=t,
        last_event=last_model_event(profile),
        cooldown_s=profile.drift.cooldown_hours * 3600,
        in_flight=retrains_in_flight(profile, exclude_run=run_id, now=t),
    )
    out = MonitorCheck(str(window), result, perf, decision)
    if result.report_html is not None:
        add_to_report(result.report_html, out)
    if not decision.decided:
        # After the report: it shows what was measured. Not a "no retrain": a scheduled
        # monitor that cannot decide must say so (exit 1, a failed step), not pass quietly.
        raise DataError(f"window {window}: {decision.reason}")
    return out


def read_texts(parquet: Path) -> list[str]:
    """The non-blank texts of a Dataset's text parquet (reference or held-out sample)."""
    import pandas as pd

    from flywheel.drift import REFERENCE_TEXT_COLUMN

    col = pd.read_parquet(parquet, columns=[REFERENCE_TEXT_COLUMN])[REFERENCE_TEXT_COLUMN]
    return [t for t in col.dropna().astype(str) if t.strip()]


def add_to_report(html: Path, result: MonitorCheck) -> None:
    """Put the champion's degradation and the decision at the top of Evidently's report,
    so the one HTML artifact shows both halves of the verdict."""
    import html as h

    rows: list[tuple[str, str]] = [("decision", result.decision.reason)]
    perf = result.performance
    if perf is not None:
        pct = round(100 * perf.confidence)
        rows += [
            ("champion bits/byte on the window", f"{perf.window_bpb:.4f} ({perf.n_window} docs)"),
            (
                f"champion bits/byte on its {perf.reference} sample",
                f"{perf.reference_bpb:.4f} ({perf.n_reference} docs)",
            ),
            (
                f"relative difference ({pct}% bootstrap interval)",
                f"{perf.rel:+.2%} ({perf.low:+.2%} .. {perf.high:+.2%})",
            ),
        ]
    w = result.drift.window
    rows.append(
        (
            "window",
            f"{w.source}: {w.records} records, {w.recent} in range, {w.rows} measured "
            f"(seed {w.seed})"
            + (
                f"; left out: {', '.join(f'{n} {r}' for r, n in w.rejected.items())}"
                if w.rejected
                else ""
            ),
        )
    )
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{h.escape(k)}</th>"
        f"<td>{h.escape(v)}</td></tr>"
        for k, v in rows
    )
    block = (
        "<section id='flywheel-monitor' style='font-family:sans-serif;margin:1em'>"
        f"<h2>Retrain decision</h2><table>{cells}</table></section>"
    )
    text = html.read_text(encoding="utf-8")
    at = text.find("<body")
    at = text.find(">", at) + 1 if at >= 0 else 0
    html.write_text(text[:at] + block + text[at:], encoding="utf-8")


# ------------------------------------------------------------------ thin adapters


def last_model_event(profile: Profile) -> float | None:
    """Epoch seconds of the last promotion/rollback or registered version, or None."""
    from flywheel.registry import Registry

    registry = Registry(profile)
    events = [*registry.history(), *registry.versions()]
    times = [t for t in (_epoch(e) for e in events) if t is not None]
    return max(times) if times else None


def _epoch(item: Any) -> float | None:
    """A history entry's `time` or a version's `created_at`, as epoch seconds."""
    value = getattr(item, "time", None) or getattr(item, "created_at", None)
    return value.timestamp() if value is not None else None


def retrains_in_flight(profile: Profile, exclude_run: str, now: float) -> list[str]:
    """Pipeline runs with a `plan` ledger entry, no `summary`, younger than STALE_RUN_S, and
    whose driver, when the plan names one on this machine, is still running: a local run
    interrupted by Ctrl-C writes no summary, and must not block retrains for hours."""
    import mlflow

    from flywheel.tracking import experiment_id, tracking_uri

    exp = experiment_id(profile)
    client = mlflow.MlflowClient(tracking_uri(profile))
    since = int((now - STALE_RUN_S) * 1000)
    started = client.search_runs(
        [exp],
        filter_string=f"tags.`{ledger.STAGE_TAG}` = 'plan' and attributes.start_time > {since}",
    )
    finished = client.search_runs(
        [exp],
        filter_string=f"tags.`{ledger.STAGE_TAG}` = 'summary' and attributes.start_time > {since}",
    )
    done = {r.data.tags.get(ledger.RUN_TAG) for r in finished}
    runs: set[str] = set()
    for entry in started:
        run = entry.data.tags.get(ledger.RUN_TAG)
        if not run or run in done or run == exclude_run:
            continue
        mark = entry.data.tags.get(ledger.DRIVER_TAG)
        if mark and ledger.driver_alive(mark) is False:
            log.info("run %s was interrupted (its driver %s is gone): not in flight", run, mark)
            continue
        runs.add(run)
    return sorted(runs)


REFERENCE_ARTIFACT = contracts.REFERENCE_SAMPLE
# The held-out sample the champion's bits per byte is compared with, logged next to the
# reference by the train step (`flywheel.tracking.log_dataset_samples`).
HELDOUT_ARTIFACT = contracts.HELDOUT_SAMPLE


@dataclass(frozen=True)
class ChampionRefs:
    reference: Path  # a sample of its training documents (distribution drift)
    heldout: Path | None  # its held-out documents (performance drift); None: an older champion
    model_dir: Path  # the model, with its tokenizer


def champion_reference(profile: Profile, dest: Path) -> ChampionRefs:
    """The champion's drift reference (a sample of its training documents), its held-out
    sample and its model.

    Found through lineage: the champion version's `training_run_id` tag names the MLflow
    run that logged the samples (see `flywheel.stages.train`), so it works wherever the
    registry does, without access to the old run's pipeline artifacts.
    """
    import mlflow

    from flywheel.registry import Registry
    from flywheel.tracking import tracking_uri

    registry = Registry(profile)
    champ = registry.champion()
    if champ is None:
        # Name the store: a command run from another directory finds another (empty) one.
        raise DataError(
            f"no champion of {profile.registry.model_name} in the registry at "
            f"{tracking_uri(profile)}: nothing to compare production data with "
            "(train one with `flywheel run`)"
        )
    run_id = champ.tags.get(contracts.TRAINING_RUN_ID)
    if not run_id:
        raise DataError(f"champion version {champ.version} has no training_run_id lineage tag")
    dest.mkdir(parents=True, exist_ok=True)
    # Through a client bound to the profile's store: the module-level download_artifacts
    # resolves `runs:/` against the process-default store.
    client = mlflow.MlflowClient(tracking_uri(profile))
    ref = client.download_artifacts(run_id, REFERENCE_ARTIFACT, str(dest))
    logged = {f.path for f in client.list_artifacts(run_id, contracts.SAMPLES_DIR)}
    heldout = (
        Path(client.download_artifacts(run_id, HELDOUT_ARTIFACT, str(dest)))
        if HELDOUT_ARTIFACT in logged
        else None
    )
    return ChampionRefs(Path(ref), heldout, registry.download(contracts.CHAMPION))


def now() -> float:
    return time.time()
