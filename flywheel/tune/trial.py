"""One trial: the training stage's own loop on a step budget, as a Ray Train run
(`TorchTrainer.fit()`), ranked on validation loss and tracked as a nested MLflow run.

Runs in one of the study's driver threads (`flywheel.tune.study`). The loop evaluates a
fixed slice of the validation split at each rung and asks this thread, through a Ray queue,
whether to go on; this thread reports the loss to the Optuna trial and answers with its
pruner's decision. A pruned run ends its own loop, so its workers and placement group are
released the ordinary way (no abort of Ray's controller from outside). Public APIs only.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from pathlib import Path
from typing import Any

from flywheel.errors import DataError
from flywheel.progress import Progress, TrialReported

log = logging.getLogger(__name__)

# The validation slice every trial is scored on: the first blocks of the dataset's
# validation split, in file order. Fixed, so trials (and rungs) are compared on the same
# tokens; small, so an evaluation costs a few forward passes.
VALIDATION_BLOCKS = 32
# How long the loop waits for the study's answer at a rung (Optuna writes to its storage).
ANSWER_TIMEOUT_S = 300.0


class TrialPruned(Exception):
    """The pruner stopped this trial at a rung (its loop ended early)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned at step {step}")
        self.step = step


def validation_slice(dataset_dir: str | Path, n: int = VALIDATION_BLOCKS) -> list[Any]:
    """The first `n` rows of the validation split, as plain data: token blocks (lists of
    ids), or for an SFT dataset samples with their labels (`{"input_ids", "labels"}`: the
    loop scores the masked response loss)."""
    import pyarrow.parquet as pq

    from flywheel import artifacts

    sft = artifacts.DatasetManifest.read(dataset_dir).format != "text"
    blocks: list[Any] = []
    for f in artifacts.split_files(dataset_dir, "validation"):
        if sft:
            cols = [artifacts.TOKEN_COLUMN, artifacts.LABEL_COLUMN]
            blocks += pq.read_table(f, columns=cols).to_pylist()[: n - len(blocks)]
        else:
            col = pq.read_table(f, columns=[artifacts.TOKEN_COLUMN]).column(0)
            blocks += [list(map(int, b)) for b in col.to_pylist()[: n - len(blocks)]]
        if len(blocks) >= n:
            break
    if not blocks:
        raise DataError(
            f"{Path(dataset_dir) / 'validation'}: no validation blocks; tuning ranks trials on "
            "validation loss (raise data.split.validation_share or prepare more data)"
        )
    return blocks


def report_steps(trial_steps: int, grace: int, factor: int) -> list[int]:
    """The steps a trial reports validation loss at: the pruner's rungs, and the last step."""
    steps, rung = set(), grace
    while rung < trial_steps:
        steps.add(rung)
        rung *= factor
    return sorted(steps | {trial_steps})


def _error_line(exc: BaseException) -> str:
    """An exception in one line; Ray's TrainingFailedError carries the worker's in its text."""
    text = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if type(exc).__name__ == "TrainingFailedError" and text:
        # The worker's own exception is the last "Name: message" line of the traceback.
        for line in reversed(text):
            name = line.split(":", 1)[0].strip()
            if name.isidentifier() and name[:1].isupper() and ":" in line:
                return line.strip()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def run_trial(job: dict[str, Any], trial: Any, emit: Progress) -> tuple[float, int]:
    """Train the Optuna `trial`'s parameters for tune.trial_steps steps.

    Returns (final validation loss, steps run); raises TrialPruned when the pruner stops it,
    or the trial's own error (the study records it as FAIL and goes on).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from ray.util.queue import Empty, Queue

    from flywheel.config import Profile
    from flywheel.storage import ray_storage
    from flywheel.train.plan import make_plan
    from flywheel.train.run import loop_config, torch_trainer
    from flywheel.tune.space import asha_schedule, plain, trial_profile

    number = trial.number
    params = {k: plain(v) for k, v in trial.params.items()}
    client = MlflowClient(job["mlflow_uri"])
    run = client.create_run(
        job["experiment_id"],
        run_name=f"trial-{number}",
        tags={
            "mlflow.parentRunId": job["parent_run_id"],
            "flywheel.stage": "tune-trial",
            "flywheel.tune_study": job["study_name"],
            "flywheel.tune_trial": str(number),
            **job["tags"],
        },
    )
    run_id = run.info.run_id
    asks = answers = None
    name = f"{job['run_prefix']}-trial{number}-{uuid.uuid4().hex[:6]}"
    store = None
    try:
        profile = trial_profile(Profile.model_validate(job["profile"]), params)
        client.log_batch(
            run_id,
            params=[Param(f"train.{k}", str(v)) for k, v in params.items()]
            + [
                Param("trial.max_steps", str(profile.train.max_steps)),
                Param("trial.init_from", str(job["init_from"] or "")),
            ],
        )
        plan = make_plan(profile, job["dataset_dir"], job["init_from"])
        # Two queue actors (no CPU): the loop's reports in, the pruner's answers out.
        asks, answers = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
        grace, factor = asha_schedule(profile.tune.trial_steps)
        config = loop_config(profile, plan, mlflow={"uri": job["mlflow_uri"], "run_id": run_id})
        config["validation"] = {
            "blocks": job["validation"],
            "at": report_steps(profile.train.max_steps, grace, factor),
            "asks": asks,
            "answers": answers,
            "timeout_s": ANSWER_TIMEOUT_S,
        }
        state: dict[str, Any] = {"value": None, "step": 0, "pruned": False}
        done = threading.Event()

        def referee() -> None:
            while not done.is_set():
                try:
                    msg = asks.get(timeout=0.5)
                except Empty:
                    continue
                except Exception:  # the queue actor is gone: the run is over
                    return
                value, step = float(msg["val_loss"]), int(msg["step"])
                state["value"], state["step"] = value, step
                prune = False
                if math.isfinite(value):
                    trial.report(value, step)
                    prune = step < profile.train.max_steps and trial.should_prune()
                state["pruned"] = prune
                emit(TrialReported(trial=number, step=step, val_loss=value))
                answers.put({"stop": prune})

        store = ray_storage(profile)
        # A trial is not retried (a failure is its result) and keeps only its last checkpoint.
        trainer = torch_trainer(
            profile, plan, config, name, store=store, max_failures=0, keep_checkpoints=1
        )
        thread = threading.Thread(target=referee, daemon=True, name=f"flywheel-trial{number}")
        thread.start()
        try:
            trainer.fit()
        finally:
            done.set()
            thread.join(timeout=5)
        if state["pruned"]:
            client.set_terminated(run_id, "KILLED")
            raise TrialPruned(state["step"])
        value = state["value"]
        if value is None or state["step"] != profile.train.max_steps:
            raise RuntimeError("the trial's loop reported no validation loss at its last step")
        client.set_terminated(run_id, "FINISHED")  # final_loss: the driver, from the study
        return value, state["step"]
    except TrialPruned:
        raise
    except BaseException as exc:
        client.set_tag(run_id, "flywheel.error", _error_line(exc)[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        for q in (asks, answers):
            if q is not None:
                try:
                    q.shutdown()
                except Exception:
                    log.debug("queue shutdown failed", exc_info=True)
        # Trial checkpoints (weights, optimizer state) are not needed once the loss is known.
        if store is not None:
            store.remove_run(name)
