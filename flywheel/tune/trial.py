"""One trial: the training stage's own loop on a step budget, as a Ray Train run inside a
Ray Tune trial, tracked as a nested MLflow run.

Runs in the Tune trial's actor. Everything it needs arrives as plain data (`job`, made by
`flywheel.tune.study`) plus the sampled parameters in `config`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

log = logging.getLogger(__name__)

TRIAL_NUMBER_KEY = "_flywheel_trial_number"
_BOX_KEY = "_flywheel_box"
# The Train controller polls its workers this often (Ray's default is 2 s). A worker waits
# for that poll after each checkpoint, and the scheduler only sees a rung's loss once it
# has happened, so on 8-step trials the default would cost more than the steps themselves.
_POLL_S = "0.25"


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class AbortableTorchTrainer(TorchTrainer):
        """A TorchTrainer that keeps its Train controller's handle.

        When the scheduler stops a trial, Ray Tune terminates the trial's actor and, with it,
        the Train controller it owns; the controller's placement group, however, belongs to
        the job and would hold its CPUs until the job ends (Ray's own clean-up of it asks the
        State API, which needs the dashboard that `flywheel.runtime` leaves off). With the
        handle the trial aborts its run first, which releases the group. The body is
        Ray 2.60's `DataParallelTrainer._initialize_and_run_controller` (Ray is pinned to
        2.60.x), plus keeping the handle.
        """

        controller: Any = None

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            import ray
            from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
            from ray.train.v2._internal.constants import (
                DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                get_env_vars_to_propagate,
            )
            from ray.train.v2._internal.execution.controller import TrainController

            env_vars = get_env_vars_to_propagate()
            env_vars.setdefault(
                RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            )
            cls = ray.remote(
                num_cpus=0,
                label_selector={
                    ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()
                },
                runtime_env={"env_vars": env_vars},
            )(TrainController)
            self.controller = cls.remote(**controller_init_kwargs)
            ray.get(self.controller.run.remote())
            return ray.get(self.controller.get_result.remote())

    return AbortableTorchTrainer


def abort(trainer: Any) -> None:
    """Abort a trial's Train run (worker group and placement group released); best effort."""
    import ray

    controller = getattr(trainer, "controller", None)
    if controller is None:
        return
    # The controller exits inside abort(), or had already finished: either is fine.
    with contextlib.suppress(Exception):
        ray.get(controller.abort.remote(), timeout=30)


def run_trial(job: dict[str, Any], config: dict[str, Any]) -> None:
    """Train one sampled configuration for tune.trial_steps steps; losses go to Tune."""
    import ray
    import ray.data
    import ray.train
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from ray.train.torch import TorchConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from flywheel import artifacts
    from flywheel.config import Profile
    from flywheel.storage import ray_storage
    from flywheel.train.plan import make_plan
    from flywheel.train.run import _materialize, loop_config
    from flywheel.tune.space import trial_profile

    box: dict[str, Any] = config.pop(_BOX_KEY, {})
    number = config.pop(TRIAL_NUMBER_KEY, None)
    params = dict(config)
    trial_id = ray.tune.get_context().get_trial_id()
    client = MlflowClient(job["mlflow_uri"])
    run = client.create_run(
        job["experiment_id"],
        run_name=f"trial-{number}",
        tags={
            "mlflow.parentRunId": job["parent_run_id"],
            "flywheel.stage": "tune-trial",
            "flywheel.tune_study": job["study_name"],
            "flywheel.tune_trial": str(number),
            "flywheel.tune_trial_id": trial_id,
            **job["tags"],
        },
    )
    run_id = run.info.run_id
    try:
        profile = trial_profile(Profile.model_validate(job["profile"]), params)
        client.log_batch(
            run_id,
            params=[Param(f"train.{k}", str(v)) for k, v in params.items()]
            + [Param("trial.max_steps", str(profile.train.max_steps))],
        )
        plan = make_plan(profile, job["dataset_dir"])
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = _POLL_S
        s = profile.train.scaling
        resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
        dataset: Any
        if _materialize(plan, resources, s.num_workers):
            import pyarrow.parquet as pq

            dataset = ray.data.from_arrow(
                pq.ParquetDataset(plan.dataset.train_files).read(columns=[artifacts.TOKEN_COLUMN])
            )
        else:
            dataset = ray.data.read_parquet(
                plan.dataset.train_files, columns=[artifacts.TOKEN_COLUMN]
            )
        from flywheel.train.loop import train_loop_per_worker

        callbacks: list[Any] = [TuneReportCallback()]
        name = f"{job['run_prefix']}-trial{number}-{uuid.uuid4().hex[:6]}"
        store = ray_storage(profile)
        trainer = _trainer_class()(
            train_loop_per_worker,
            train_loop_config=loop_config(
                profile, plan, mlflow={"uri": job["mlflow_uri"], "run_id": run_id}
            ),
            torch_config=TorchConfig(backend=plan.backend),
            scaling_config=ray.train.ScalingConfig(
                num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=store.path,
                storage_filesystem=store.filesystem,
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
            ),
            datasets={"train": dataset},
        )
        box["trainer"] = trainer
        trainer.fit()
        client.set_terminated(run_id, "FINISHED")  # final_loss: the driver, from the study
        # Trial checkpoints (weights, optimizer state) are not needed once the loss is known.
        store.remove_run(name)
    except BaseException as exc:
        if box.get("stopped"):  # the scheduler stopped this trial: pruned, not failed
            client.set_terminated(run_id, "KILLED")
            return
        client.set_tag(run_id, "flywheel.error", f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise


def trainable(job: dict[str, Any]):
    """The Tune trainable for a study: `run_trial` bound to `job`, which aborts its Train
    run when Tune stops it (see AbortableTorchTrainer for why)."""
    from ray.tune.trainable.function_trainable import wrap_function

    def trial(config: dict[str, Any]) -> None:
        run_trial(job, config)

    base = wrap_function(trial)

    class FlywheelTrial(base):  # type: ignore[misc,valid-type]
        def _trainable_func(self, config):
            self._flywheel_box = box = {}
            return super()._trainable_func({**config, _BOX_KEY: box})

        def _stop_run(self) -> None:
            box = getattr(self, "_flywheel_box", {})
            box["stopped"] = True
            abort(box.get("trainer"))

        def cleanup(self):
            self._stop_run()
            super().cleanup()

        def reset_config(self, new_config):
            # Tune reuses this actor for the next trial (no new process, no re-imports);
            # the previous trial's run, if a stop cut it short, is aborted first.
            self._stop_run()
            return super().reset_config(new_config)

    return FlywheelTrial
