"""The tuning stage on the driver: an Optuna study (TPE) driven by Ray Tune, ASHA stopping.

    result = tune(profile, Path("dataset"), Path("out"))

Why Ray Tune's ASHA rather than an Optuna pruner: a trial here is a Ray Train run whose loop
(the training stage's own, unchanged) never asks "should I stop?". ASHA decides in the
driver from the losses the run reports, and Ray Tune stops the trial itself; an Optuna
pruner would need the trial process to poll `trial.should_prune()` between steps. Optuna
still owns the search (TPE) and the record: `OptunaSearch` asks and tells the study, so
the study in SQLite (or an RDB on a cluster) holds every trial, its state and its
per-step losses, and a rerun with the same study name continues it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flywheel.config import Profile
from flywheel.errors import FlywheelError
from flywheel.tune.report import BEST_PARAMS_FILE, TrialRecord, TuneResult
from flywheel.tune.space import asha_schedule, check_space, masked, plain, storage_url
from flywheel.tune.trial import TRIAL_NUMBER_KEY, trainable

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]
METRIC = "loss"
# What a trial's driver reserves: no CPU (it only waits on its Train run, whose workers
# hold the CPUs), but Tune needs some resource in a trial's bundle, and memory is the honest
# one: the driver process holds ~250 MB (torch imported for the plan).
TRIAL_DRIVER_MEMORY = 256 * 1024**2


def _searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class StepOptunaSearch(OptunaSearch):
        """OptunaSearch that records what happened to each trial in Optuna's own terms.

        Ray's version reports intermediate values per Tune iteration and records a trial the
        scheduler stopped as COMPLETE with its early loss; here intermediate values are per
        optimizer step, a stopped trial is PRUNED, and an error is FAIL even after reports.
        """

        def __init__(self, *args: Any, trial_steps: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.trial_steps = trial_steps
            self._steps_seen: dict[str, set[int]] = {}

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            if config is not None:
                config[TRIAL_NUMBER_KEY] = self._ot_trials[trial_id].number
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            value, step = result.get(METRIC), result.get("step")
            trial = self._ot_trials.get(trial_id)
            if value is None or step is None or trial is None:
                return
            seen = self._steps_seen.setdefault(trial_id, set())
            if int(step) not in seen:
                seen.add(int(step))
                trial.report(float(value), int(step))

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial, study = self._ot_trials[trial_id], self._ot_study
            assert study is not None
            # The result that ends a trial (its last step, or the rung where ASHA stopped it)
            # reaches the searcher only here.
            self.on_trial_result(trial_id, result or {})
            value = (result or {}).get(METRIC)
            finished = (result or {}).get("step", 0) >= self.trial_steps
            if error or value is None or not math.isfinite(value):
                study.tell(ot_trial, state=TrialState.FAIL)
            elif finished:
                study.tell(ot_trial, float(value))
            else:
                study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)

    return StepOptunaSearch


def _progress_callback(emit: Progress):
    from ray.tune import Callback

    class Relay(Callback):
        """Trial events to `progress`. The class holds no reference to `emit` (an instance
        attribute, dropped when pickled): Tune pickles its run config, callbacks included,
        with the experiment state, and the caller's callback (a progress bar) cannot go."""

        emit: Progress | None = None

        def __getstate__(self) -> dict:
            return {"emit": None}

        def _send(self, event: str, data: dict) -> None:
            if self.emit is not None:
                self.emit(event, data)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._send("result", {"trial": trial.config.get(TRIAL_NUMBER_KEY), **_short(result)})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._send("trial", {"trial": trial.config.get(TRIAL_NUMBER_KEY), "error": False})

        def on_trial_error(self, iteration, trials, trial, **info):
            self._send("trial", {"trial": trial.config.get(TRIAL_NUMBER_KEY), "error": True})

    relay = Relay()
    relay.emit = emit
    return relay


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Ray Tune's new console output prints an experiment banner and paths even at
    verbose=0; the stage reports through `progress` instead. The old reporter at verbose=0
    prints nothing, and this variable is read when `fit` starts."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _short(result: dict) -> dict:
    return {k: result[k] for k in ("step", METRIC) if k in result}


def _error_line(error: BaseException | None) -> str:
    """The trial's own exception in one line (Ray wraps it in a RayTaskError)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


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

    Done here, from the study, rather than in the trial: ASHA stops every trial at its
    last step too (time_attr reached max_t), so a finished trial's actor may be torn down
    while its Train run is still closing, and what the trial wrote last is not reliable.
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
    tags: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Run `tune.n_trials` more trials of the profile's study; write best_params.json.

    progress: called as progress(event, data), events "start", "result", "trial", "done".
    """
    import optuna
    from mlflow import MlflowClient
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from flywheel import tracking
    from flywheel.runtime import check_before_start, ray_session
    from flywheel.storage import ray_storage
    from flywheel.train.plan import make_plan, tune_resources
    from flywheel.tune.space import trial_profile

    t0 = time.perf_counter()
    emit = progress or (lambda _event, _data: None)
    cfg = profile.tune
    dataset_dir, out_dir = Path(dataset_dir).absolute(), Path(out_dir)
    space = check_space(profile)
    # The data and model checks of the training stage, once, before any trial: a dataset
    # too small for the smallest batch fails here with the training stage's message.
    make_plan(trial_profile(profile, {}), dataset_dir)
    # tune.parallel trials at once must fit what Ray has (a local Ray: known before it starts,
    # and before the study or an MLflow run is created).
    need = [tune_resources(profile)]
    check_before_start(profile.ray, need)
    # Trial checkpoints: storage.root/ray or <state_dir>/ray; an unreachable store fails here.
    store = ray_storage(profile, check=True)

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
    grace, factor = asha_schedule(cfg.trial_steps)
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            metric=METRIC,
            mode="min",
            max_t=cfg.trial_steps,
            grace_period=grace,
            reduction_factor=factor,
        )
        if cfg.pruner == "asha"
        else FIFOScheduler()
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
        ],
    )
    prefix = f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job = {
        "profile": profile.model_dump(mode="json"),
        "dataset_dir": str(dataset_dir),
        "mlflow_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_id,
        "study_name": cfg.study_name,
        "run_prefix": prefix,
        "tags": dict(tags or {}),
    }
    try:
        with ray_session(profile.ray, need):
            searcher = _searcher_class()(
                space,
                metric=METRIC,
                mode="min",
                sampler=sampler,
                study_name=cfg.study_name,
                storage=storage,
                trial_steps=cfg.trial_steps,
            )
            emit(
                "start",
                {
                    "study": cfg.study_name,
                    "first_trial": first_number,
                    "n_trials": cfg.n_trials,
                    "parallel": cfg.parallel,
                    "pruner": cfg.pruner,
                    "storage": masked(url),
                    "mlflow_run_id": parent_id,
                },
            )
            tuner = rtune.Tuner(
                rtune.with_resources(trainable(job), {"memory": TRIAL_DRIVER_MEMORY}),
                tune_config=rtune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=cfg.n_trials,
                    max_concurrent_trials=cfg.parallel,
                    # A trial's process imports torch, transformers and MLflow (~10 s of CPU
                    # here); reusing it for the next trial pays that once per slot.
                    reuse_actors=True,
                ),
                run_config=rtune.RunConfig(
                    name=prefix,
                    storage_path=store.path,
                    storage_filesystem=store.filesystem,
                    verbose=0,
                    callbacks=[_progress_callback(emit)],
                ),
            )
            with _quiet_tune():
                grid = tuner.fit()
        stopped = {}
        errors: list[tuple[int, str]] = []
        for i in range(len(grid)):
            res = grid[i]
            number = (res.config or {}).get(TRIAL_NUMBER_KEY)
            if number is None:
                continue
            stopped[number] = int((res.metrics or {}).get("step") or 0)
            if res.error is not None:
                errors.append((number, _error_line(res.error)))
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
        records = _records(study, first_number, stopped)
        mine = [r for r in records if r.this_run]
        if mine and all(r.state == "FAIL" for r in mine):
            first = min(errors)[1] if errors else "no error recorded"
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
            errors={n: e for n, e in errors},
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
    finally:
        # Ray Train run directories of stopped trials (finished ones clean up after themselves).
        store.remove_runs(f"{prefix}-trial")
    client.set_terminated(parent_id, "FINISHED")
    emit("done", result.metrics())
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
