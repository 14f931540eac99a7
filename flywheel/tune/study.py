"""The tuning stage on the driver: an Optuna study (TPE) with Optuna's successive-halving
(ASHA) pruner, each trial a Ray Train run of the training stage's own loop.

    result = tune(profile, Path("dataset"), Path("out"))

Public APIs only. Optuna is driven directly (`study.ask` / `study.tell`), `tune.parallel`
trials at once in driver threads, each calling `TorchTrainer.fit()`. A trial's loop reports
validation loss on a fixed slice of the validation split at each rung and asks whether to go
on (`flywheel.tune.trial`); the pruner decides on those losses, and the study's best trial is
the one with the lowest final validation loss. The study in SQLite (or an RDB on a cluster)
holds every trial, its state and its per-rung losses, and a rerun with the same study name
continues it.

The objective is validation loss in nats per token. Every trial of a study tokenizes with
the same dataset tokenizer, so it ranks trials exactly as bits per byte would.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flywheel.config import Profile
from flywheel.errors import FlywheelError
from flywheel.progress import Event, Progress, StageDone, StudyStarted, TrialEnded
from flywheel.tune.report import BEST_PARAMS_FILE, TrialRecord, TuneResult
from flywheel.tune.space import asha_schedule, check_space, masked, plain, storage_url
from flywheel.tune.trial import TrialPruned, _error_line, run_trial, validation_slice

log = logging.getLogger(__name__)

METRIC = "val_loss"


def _pruner(cfg):
    """tune.pruner as an Optuna pruner. "asha": successive halving, asynchronous (a trial
    is judged at a rung against the trials that reached it so far, none waits for others)."""
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    grace, factor = asha_schedule(cfg.trial_steps)
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=grace, reduction_factor=factor, min_early_stopping_rate=0
    )


def run_trials(study, space: dict[str, Any], n_trials: int, parallel: int, one_trial) -> dict:
    """Ask, run and tell `n_trials` trials, `parallel` at once; returns {number: error line}.

    `one_trial(trial)` returns (value, steps) or raises TrialPruned / any error. Asking
    happens under a lock so each trial number gets its draw in order (a seeded sampler
    gives the same first draws to the same numbers, whatever the thread timing).
    """
    from optuna.trial import TrialState

    lock = threading.Lock()
    launched = [0]
    errors: dict[int, str] = {}
    steps: dict[int, int] = {}

    def slot() -> None:
        while True:
            with lock:
                if launched[0] >= n_trials:
                    return
                launched[0] += 1
                trial = study.ask(space)
            try:
                value, ran = one_trial(trial)
            except TrialPruned as exc:
                steps[trial.number] = exc.step
                study.tell(trial, state=TrialState.PRUNED)
            except Exception as exc:
                errors[trial.number] = _error_line(exc)
                log.warning("trial %d failed: %s", trial.number, errors[trial.number])
                study.tell(trial, state=TrialState.FAIL)
            else:
                steps[trial.number] = ran
                if value != value or value in (float("inf"), float("-inf")):  # NaN / inf
                    errors[trial.number] = f"validation loss is {value}"
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, float(value))

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="flywheel-tune") as pool:
        for f in [pool.submit(slot) for _ in range(min(parallel, n_trials))]:
            f.result()
    return {"errors": errors, "steps": steps}


def _records(study, first_number: int, stopped_steps: dict[int, int]) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        inter = {int(k): float(v) for k, v in sorted(t.intermediate_values.items())}
        out.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                value=float(t.value) if t.value is not None else None,
                params={k: plain(v) for k, v in t.params.items()},
                intermediate=inter,
                steps=stopped_steps.get(t.number, max(inter, default=0)),
                this_run=t.number >= first_number,
            )
        )
    return out


_MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _finish_nested_runs(client, experiment_id: str, parent: str, records: list[TrialRecord]):
    """Make each trial's MLflow run say what the study says: its Optuna state as a tag and
    status, and a finished trial's loss as `final_loss`.

    Done here, from the study, so the tags and statuses say exactly what the study says.
    """
    from mlflow.entities import Metric

    by_number = {str(r.number): r for r in records}
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000
    )
    now = int(time.time() * 1000)
    for run in runs:
        rec = by_number.get(run.data.tags.get("flywheel.tune_trial", ""))
        if rec is None:
            continue
        client.set_tag(run.info.run_id, "flywheel.tune_state", rec.state)
        if rec.state == "COMPLETE" and rec.value is not None:
            client.log_batch(
                run.info.run_id, metrics=[Metric("final_loss", rec.value, now, rec.steps)]
            )
        status = _MLFLOW_STATUS.get(rec.state)
        if status and run.info.status != status:
            client.set_terminated(run.info.run_id, status)


def tune(
    profile: Profile,
    dataset_dir: Path,
    out_dir: Path,
    *,
    init_from: str | None = None,
    tags: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Run `tune.n_trials` more trials of the profile's study; write best_params.json.

    init_from: the model every trial starts from, as the training step will (the pipeline
    passes the registry champion when the profile warm-starts); otherwise `model.base`,
    otherwise a fresh model seeded with train.seed.
    progress: called with StudyStarted, each trial's TrialReported and TrialEnded, then
    StageDone (from the trials' threads, one at a time).
    """
    import optuna
    from mlflow import MlflowClient

    from flywheel import tracking
    from flywheel.runtime import check_before_start, ray_session
    from flywheel.runtime.crossing import handoff_root
    from flywheel.storage import ray_storage
    from flywheel.train.plan import make_plan, tune_resources
    from flywheel.tune.space import trial_profile

    t0 = time.perf_counter()
    emit_lock = threading.Lock()

    def emit(event: Event) -> None:
        if progress is not None:
            with emit_lock:
                progress(event)

    cfg = profile.tune
    dataset_dir, out_dir = Path(dataset_dir).absolute(), Path(out_dir)
    space = check_space(profile)
    # The data and model checks of the training stage, once, before any trial: a dataset
    # too small for the smallest batch fails here with the training stage's message.
    make_plan(trial_profile(profile, {}), dataset_dir, init_from)
    validation = validation_slice(dataset_dir)
    # tune.parallel trials at once must fit what Ray has (a local Ray: known before it starts,
    # and before the study or an MLflow run is created).
    need = [tune_resources(profile)]
    check_before_start(profile.ray, need)
    # Trial checkpoints: storage.root/ray or <state_dir>/ray; an unreachable store fails here.
    ray_storage(profile, check=True)
    # Trials' workers on other machines get URIs under storage.root (runtime.crossing).
    handoff_root(profile)

    url = storage_url(profile)
    try:
        storage = optuna.storages.RDBStorage(url)
        study = optuna.create_study(
            storage=storage, study_name=cfg.study_name, direction="minimize", load_if_exists=True
        )
    except Exception as exc:  # unreachable server, bad URL, a study made to maximize
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlywheelError(
            f"tune.storage: cannot open study '{cfg.study_name}' at {masked(url)}: {line}"
        ) from None
    first_number = len(study.get_trials(deepcopy=False))
    # Seeded per continuation: a fixed seed would replay the first run's random start-up
    # draws on every rerun of the study. Few start-up trials because runs are small (4 by
    # default) and the study carries over: TPE takes over after the first couple of runs.
    sampler = optuna.samplers.TPESampler(
        seed=cfg.seed + first_number,
        n_startup_trials=max(2, min(10, cfg.n_trials // 2)),
        constant_liar=True,  # parallel trials: pending ones count as bad, so they spread
    )
    study = optuna.load_study(
        study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=_pruner(cfg)
    )

    uri = tracking.tracking_uri(profile)
    experiment_id = tracking.experiment_id(profile)
    client = MlflowClient(uri)
    run_tags = {"flywheel.stage": "tune", "flywheel.tune_study": cfg.study_name, **(tags or {})}
    parent = client.create_run(experiment_id, run_name=f"tune-{cfg.study_name}", tags=run_tags)
    parent_id = parent.info.run_id
    from mlflow.entities import Metric, Param

    client.log_batch(
        parent_id,
        params=[
            Param("tune.study_name", cfg.study_name),
            Param("tune.storage", masked(url)),
            Param("tune.n_trials", str(cfg.n_trials)),
            Param("tune.trial_steps", str(cfg.trial_steps)),
            Param("tune.parallel", str(cfg.parallel)),
            Param("tune.pruner", cfg.pruner),
            Param("tune.seed", str(cfg.seed)),
            Param("tune.search_space", json.dumps(cfg.search_space)[:6000]),
            Param("tune.first_trial", str(first_number)),
            Param("tune.objective", f"{METRIC} (nats/token, {len(validation)} validation blocks)"),
            Param("tune.init_from", str(init_from or "")),
        ],
    )
    prefix = f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job = {
        "profile": profile.model_dump(mode="json"),
        "dataset_dir": str(dataset_dir),
        "init_from": init_from,
        "validation": validation,
        "mlflow_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_id,
        "study_name": cfg.study_name,
        "run_prefix": prefix,
        "tags": dict(tags or {}),
    }

    def one_trial(trial) -> tuple[float, int]:
        try:
            out = run_trial(job, trial, emit)
        except TrialPruned:
            emit(TrialEnded(trial=trial.number, error=False))
            raise
        except Exception:
            emit(TrialEnded(trial=trial.number, error=True))
            raise
        emit(TrialEnded(trial=trial.number, error=False))
        return out

    try:
        with ray_session(profile.ray, need):
            emit(
                StudyStarted(
                    study=cfg.study_name,
                    first_trial=first_number,
                    n_trials=cfg.n_trials,
                    parallel=cfg.parallel,
                    pruner=cfg.pruner,
                    storage=masked(url),
                    mlflow_run_id=parent_id,
                )
            )
            ran = run_trials(study, space, cfg.n_trials, cfg.parallel, one_trial)
        errors: dict[int, str] = ran["errors"]
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
        records = _records(study, first_number, ran["steps"])
        mine = [r for r in records if r.this_run]
        if mine and all(r.state == "FAIL" for r in mine):
            first = errors[min(errors)] if errors else "no error recorded"
            raise FlywheelError(
                f"tuning: all {len(mine)} trials of study '{cfg.study_name}' failed; "
                f"the first: {first}"
            )
        best = _best(records, set(space))
        if best is None:
            raise FlywheelError(
                f"tuning: no trial of study '{cfg.study_name}' finished its "
                f"{cfg.trial_steps} steps (all pruned or failed); raise tune.n_trials"
            )
        importances = _importances(study, set(space))
        result = TuneResult(
            best_params={k: best.params[k] for k in space},
            best_value=float(best.value),  # type: ignore[arg-type]
            best_trial=best.number,
            trials_complete=sum(r.state == "COMPLETE" for r in mine),
            trials_pruned=sum(r.state == "PRUNED" for r in mine),
            trials_failed=sum(r.state == "FAIL" for r in mine),
            trial_steps_spent=sum(r.steps for r in mine),
            trial_steps_budget=cfg.n_trials * cfg.trial_steps,
            study_name=cfg.study_name,
            storage=masked(url),
            study_trials=len(records),
            first_trial=first_number,
            pruner=cfg.pruner,
            trial_steps=cfg.trial_steps,
            trials=records,
            importances=importances,
            errors=dict(errors),
            mlflow_run_id=parent_id,
            wall_s=time.perf_counter() - t0,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        best_file = out_dir / BEST_PARAMS_FILE
        best_file.write_text(json.dumps(result.best_params, indent=2))
        result.best_params_path = str(best_file)
        _finish_nested_runs(client, experiment_id, parent_id, records)
        now = int(time.time() * 1000)
        client.log_batch(
            parent_id,
            metrics=[Metric(k, v, now, 0) for k, v in result.metrics().items()],
            params=[Param(f"best.{k}", str(v)) for k, v in result.best_params.items()],
        )
        client.log_artifact(parent_id, str(best_file))
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(parent_id, "FINISHED")
    emit(StageDone("tune", result.metrics()))
    return result


def _best(records: list[TrialRecord], names: set[str]) -> TrialRecord | None:
    """The best finished trial of the whole study that sampled exactly today's parameters
    (a study continued with a changed space keeps older trials that cannot be merged)."""
    done = [
        r
        for r in records
        if r.state == "COMPLETE" and r.value is not None and set(r.params) == names
    ]
    return min(done, key=lambda r: (r.value, r.number)) if done else None


def _importances(study, names: set[str]) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA), or {} when they cannot be estimated:
    fewer than two finished trials, or a single parameter (importance 1.0 says nothing)."""
    import optuna

    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if set(t.params) == names
    ]
    if len(done) < 2 or len(names) < 2:
        return {}
    try:
        imp = optuna.importance.get_param_importances(study, params=sorted(names))
    except Exception as exc:  # e.g. every finished trial sampled the same values
        log.info("parameter importances not available: %s", exc)
        return {}
    return {k: float(v) for k, v in imp.items()}
