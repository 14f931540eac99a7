"""The training stage on the driver: plan, track, run Ray Train, export the model.

    result = train(profile, Path("dataset"), Path("model"))

Order matters for the failure rules: every check (`make_plan`, `resume_from`) runs before
Ray starts; MLflow is opened only once the plan is sound; the run is marked FAILED in
MLflow when training fails, and the error names what to do.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flywheel import artifacts, contracts, storage
from flywheel.config import Profile
from flywheel.errors import ConfigError, FlywheelError, StorageError
from flywheel.progress import Progress, StageDone, TrainPlanned, TrainStarted, TrainStep, ignore
from flywheel.sft.lora import ADAPTER_DIR
from flywheel.train.loop import HF_DIR, STATE_FILE, train_loop_per_worker
from flywheel.train.plan import TrainPlan, make_plan, train_resources
from flywheel.train.report import TrainResult, loop_throughput, loss_curve_html

log = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.html"


# ------------------------------------------------------------------ checkpoints


def checkpoint_step(path: Path) -> int | None:
    state = path / STATE_FILE
    if not state.is_file():
        return None
    return int(json.loads(state.read_text())["step"])


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """A checkpoint directory, or the latest checkpoint inside a run directory."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"train.resume_from: {root} is not a directory")
    step = checkpoint_step(root)
    if step is not None:
        return root, step
    found = [(s, p) for p in root.glob("checkpoint_*") if (s := checkpoint_step(p)) is not None]
    if not found:
        raise ConfigError(f"train.resume_from: no checkpoint ({STATE_FILE}) in {root}")
    step, best = max(found)
    return best, step


def check_resume_world_size(checkpoint: Path, world_size: int) -> None:
    """A checkpoint written by N workers holds N ranks' ZeRO shards; DeepSpeed cannot load
    them into another number of workers without converting them to a universal checkpoint
    first (`ds_to_universal`, not done here). Fail before training, naming both numbers.
    A checkpoint from before the count was recorded passes (DeepSpeed then decides)."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    written = state.get("world_size")
    if written is not None and int(written) != world_size:
        raise ConfigError(
            f"train.resume_from: {checkpoint} was written by {written} workers and this run "
            f"has {world_size} (train.scaling.num_workers); resume with {written} workers, or "
            "convert it to a DeepSpeed universal checkpoint and start from its weights"
        )


def ray_run_name(run_key: str | None) -> str:
    """The Ray run's directory name: fixed per pipeline run (so a retried step finds its
    checkpoints), unique otherwise. Only characters every object store and path accept."""
    if run_key:
        return "train-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_key).strip("-.")[:120]
    return f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def stored_step(store: storage.RayStorage, run_name: str) -> int | None:
    """The step of the latest checkpoint a previous attempt left under `run_name`, or None.

    Ray Train restores the checkpoint itself (same name, same storage); this reads the
    step only to report it and to time this attempt's own steps apart from earlier ones.
    """
    import pyarrow.fs as pafs

    fs = store.filesystem or pafs.LocalFileSystem()
    run = store.location.child(run_name).path
    steps = []
    try:
        for info in fs.get_file_info(pafs.FileSelector(run, allow_not_found=True)):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            state = f"{info.path}/{STATE_FILE}"
            if fs.get_file_info(state).type == pafs.FileType.File:
                with fs.open_input_stream(state) as fh:
                    steps.append(int(json.loads(fh.read().decode())["step"]))
    except Exception as exc:
        raise StorageError(
            storage.explain(exc, store.location, "storage.root", store.endpoint_url)
        ) from None
    return max(steps) if steps else None


def _checkpoint_uri(checkpoint: Any) -> str:
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return str(checkpoint.path)
    scheme = "gs" if checkpoint.filesystem.type_name == "gcs" else checkpoint.filesystem.type_name
    return f"{scheme}://{checkpoint.path}"


@contextmanager
def _local_checkpoint(checkpoint: Any) -> Iterator[Path]:
    """The final checkpoint's state and exported weights on local disk: the directory itself
    when the storage is local, else a temporary copy of just those two entries (the DeepSpeed
    shards, the bulk of a checkpoint, stay in object storage)."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="flywheel-ckpt-") as tmp:
        yield storage.download(
            checkpoint.filesystem,
            checkpoint.path,
            Path(tmp),
            names=(STATE_FILE, HF_DIR, ADAPTER_DIR),
        )


# --------------------------------------------------------------------- tracking


def flat_params(profile: Profile, plan: TrainPlan) -> dict[str, str]:
    """model.* and train.* as dotted keys, plus the derived numbers a reader compares runs by."""

    def walk(prefix: str, value: Any, out: dict[str, str]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v, out)
        else:
            out[prefix] = str(value)

    out: dict[str, str] = {}
    walk("model", profile.model.model_dump(), out)
    walk("train", profile.train.model_dump(), out)
    out |= {
        "plan.global_batch": str(plan.global_batch),
        "plan.precision": plan.precision,
        "plan.backend": plan.backend,
        "plan.model_source": plan.model_source.kind,
        "plan.model_path": str(plan.model_source.path),
        "data.train_tokens": str(plan.dataset.train_tokens),
        "data.block_size": str(plan.dataset.block_size),
        "data.path": plan.dataset.path,
    }
    return out


@contextmanager
def _mlflow_run(
    profile: Profile, plan: TrainPlan, tags: dict[str, str]
) -> Iterator[tuple[str, str]]:
    """Open a run (params, tags), yield (tracking uri, run id); close it FINISHED or FAILED."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from flywheel import tracking

    uri = tracking.tracking_uri(profile)
    exp = tracking.experiment_id(profile)
    client = MlflowClient(uri)
    all_tags = {"flywheel.stage": "train", **tags}
    if plan.dataset.content_hash:
        all_tags[contracts.TAG_DATA_HASH] = plan.dataset.content_hash
    if plan.tokenizer_matches_model is False:
        all_tags["flywheel.tokenizer_mismatch"] = "true"
    commit = tracking.git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp, run_name=tags.get("run_name"), tags=all_tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in flat_params(profile, plan).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=params[i : i + 100])
    try:
        yield uri, run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@contextmanager
def _progress_relay(progress: Progress | None) -> Iterator[Any]:
    """A Ray queue that rank 0 puts step rows into; a thread here hands them to `progress`."""
    if progress is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                progress(TrainStep(**queue.get(timeout=0.5)))
            except Empty:
                continue
            except Exception:  # the queue actor is gone at shutdown
                return

    thread = threading.Thread(target=drain, daemon=True, name="flywheel-train-progress")
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=2)
        for row in queue.get_nowait_batch(queue.qsize()):
            progress(TrainStep(**row))
        queue.shutdown()


# ------------------------------------------------------------------------ train


def loop_config(
    profile: Profile,
    plan: TrainPlan,
    *,
    mlflow: dict[str, str] | None = None,
    progress_queue: Any = None,
    fault: dict[str, Any] | None = None,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Everything `train_loop_per_worker` needs, as plain data.

    resume_from goes to the loop rather than to TorchTrainer(resume_from_checkpoint=...),
    which Ray Train v2 deprecates in favour of exactly this.
    Where the workers may run on other machines (`flywheel.runtime.crossing`), the plan's
    directories and resume_from are uploaded under storage.root and given as URIs.
    """
    from flywheel.runtime.crossing import for_workers

    worker_plan, resume = for_workers(profile, plan, resume_from)
    return {
        "profile": profile.model_dump(mode="json"),
        "plan": worker_plan.model_dump(mode="json"),
        "mlflow": mlflow,
        "progress_queue": progress_queue,
        "fault": fault,
        "resume_from": resume,
    }


# Token datasets up to this size are read into the object store before the workers start.
# Packed int32 tokens are compact (the default local corpus is ~10 MB), and reading them
# up front frees the CPUs the streaming read would otherwise compete with training for.
MATERIALIZE_BELOW_BYTES = 512 * 1024**2


def worker_resources(profile: Profile) -> dict[str, float]:
    """One training worker's Ray resources (`ScalingConfig.resources_per_worker`)."""
    s = profile.train.scaling
    return {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})


def read_up_front(plan: TrainPlan, per_worker: dict[str, float], workers: int) -> bool:
    """Read the split up front when it is small, or when streaming could never run.

    Ray Data streams with the CPUs Train leaves over; on a 2-CPU Ray with two 1-CPU workers
    that is none, and a streaming read would wait forever ("Cluster resources are not
    enough to run any task from ReadFiles..."). Reading before the workers start avoids it.
    """
    import ray

    size = sum(Path(f).stat().st_size for f in plan.dataset.train_files)
    spare = ray.cluster_resources().get("CPU", 0) - per_worker.get("CPU", 0) * workers
    if size >= MATERIALIZE_BELOW_BYTES and spare < 1:
        log.warning(
            "no CPU left for streaming %d MB of training data; reading it up front", size >> 20
        )
    return size < MATERIALIZE_BELOW_BYTES or spare < 1


def training_dataset(profile: Profile, plan: TrainPlan, files: list[str] | None = None) -> Any:
    """The train split as a Ray Dataset for the workers (a training run and a trial alike).

    files: the split as the workers see it (URIs where they may be on other machines,
    `loop_config`'s plan); the driver reads `plan`'s own paths when it reads up front."""
    import ray.data

    from flywheel.runtime.crossing import dataset_filesystem

    workers = profile.train.scaling.num_workers
    # SFT samples carry their labels (-100 on prompts); packed text blocks are their own.
    columns = [artifacts.TOKEN_COLUMN, *([artifacts.LABEL_COLUMN] if plan.dataset.is_sft else [])]
    if read_up_front(plan, worker_resources(profile), workers):
        import pyarrow.parquet as pq

        # Read here with pyarrow and hand Ray the table: for a small split this is ~0.1 s,
        # where a Ray Data read (list files, schedule read tasks) takes several seconds.
        return ray.data.from_arrow(
            pq.ParquetDataset(plan.dataset.train_files).read(columns=columns)
        )
    files = files or plan.dataset.train_files
    fs = dataset_filesystem(files, profile.storage.endpoint_url)
    if fs is not None:  # URIs: the read tasks on the cluster open them with this filesystem
        files = [storage.parse(f, "storage.root").path for f in files]
    return ray.data.read_parquet(files, columns=columns, filesystem=fs)


def torch_trainer(
    profile: Profile,
    plan: TrainPlan,
    config: dict[str, Any],
    run_name: str,
    *,
    store: storage.RayStorage,
    max_failures: int,
    keep_checkpoints: int,
    callbacks: list[Any] | None = None,
) -> Any:
    """The Ray Train run of `train_loop_per_worker`: a training run and a tuning trial alike."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = profile.train.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=plan.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=worker_resources(profile),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=store.path,
            storage_filesystem=store.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
        datasets={
            "train": training_dataset(profile, plan, config["plan"]["dataset"]["train_files"])
        },
    )


def _fit(
    profile: Profile,
    plan: TrainPlan,
    config: dict[str, Any],
    run_name: str,
    *,
    store: storage.RayStorage,
    callbacks: list[Any] | None = None,
):
    """Run Ray Train. callbacks: Ray Train `UserCallback`s for the run (tuning passes Tune's
    `TuneReportCallback` so each trial's reports reach its scheduler).

    Checkpoints go to `store` (storage.root/ray or <state_dir>/ray). A run of the same name
    already there is continued: Ray Train restores its checkpoint list from that directory,
    and `ray.train.get_checkpoint()` in the loop returns the latest one."""
    import ray.train

    trainer = torch_trainer(
        profile,
        plan,
        config,
        run_name,
        store=store,
        max_failures=profile.train.max_failures,
        keep_checkpoints=profile.train.keep_checkpoints,
        callbacks=callbacks,
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise FlywheelError(
            f"training failed (train.max_failures={profile.train.max_failures} restarts used): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; checkpoints are in "
            f"{store.run_uri(run_name)}"
        ) from exc


def _export(
    checkpoint_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    summary: dict[str, Any],
    profile: Profile,
) -> None:
    """save_pretrained layout: the final weights, the dataset's tokenizer, the training record."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in (checkpoint_dir / HF_DIR).iterdir():
        shutil.copy2(item, out_dir / item.name)
    if (checkpoint_dir / ADAPTER_DIR).is_dir():  # a LoRA run: the registry logs it too
        shutil.copytree(checkpoint_dir / ADAPTER_DIR, out_dir / ADAPTER_DIR, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(str(dataset_dir / artifacts.TOKENIZER_DIR)).save_pretrained(
        str(out_dir)
    )
    info = {
        "model": profile.model.model_dump(mode="json"),
        "train": profile.train.model_dump(mode="json"),
        "summary": summary,
    }
    (out_dir / artifacts.TRAINING_INFO).write_text(json.dumps(info, indent=2))


def train(
    profile: Profile,
    dataset_dir: Path,
    out_dir: Path,
    *,
    init_from: str | None = None,
    tags: dict[str, str] | None = None,
    progress: Progress | None = None,
    fault: dict[str, Any] | None = None,
    run_key: str | None = None,
) -> TrainResult:
    """Train (or continue training) a causal LM on a prepared dataset; write a Model artifact.

    init_from: a local save_pretrained directory to warm-start from (the pipeline passes the
    registry champion); otherwise `model.base`, otherwise a fresh model from `model.*`.
    progress: called with TrainPlanned, TrainStarted, each TrainStep, then StageDone.
    fault: test hook, {"step": k, "rank": r, "marker": path}: worker r SIGKILLs itself
    before step k, once (the marker file remembers), to exercise recovery.
    run_key: names the Ray run (the pipeline passes its run id). A retried step of the same
    pipeline run finds its predecessor's checkpoints in the checkpoint storage under that
    name and continues from the latest, instead of training again from step 0. None: a
    fresh name, a fresh run.
    """
    from flywheel.runtime import check_before_start, ray_session
    from flywheel.runtime.crossing import handoff_root

    t0 = time.perf_counter()
    emit = progress or ignore
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    plan = make_plan(profile, dataset_dir, init_from)
    # What the workers will ask of Ray: a request Ray cannot place would wait forever (Ray
    # Train retries the start every minute), so it fails here, naming the fields; for a
    # local Ray before it starts, for a cluster in ray_session below.
    need = [train_resources(profile)]
    check_before_start(profile.ray, need)
    # Before MLflow and Ray: a missing bucket or bad credentials fail here, in one line.
    store = storage.ray_storage(profile, check=True)
    # Workers on other machines cannot be handed this machine's paths: say so before Ray.
    handoff_root(profile)
    run_name = ray_run_name(run_key)
    resume, resume_step = (None, 0)
    if profile.train.resume_from:
        resume, resume_step = find_checkpoint(profile.train.resume_from)
        check_resume_world_size(resume, plan.world_size)
        if resume_step >= profile.train.max_steps:
            raise ConfigError(
                f"train.resume_from: {resume} is at step {resume_step}, not below "
                f"train.max_steps ({profile.train.max_steps}); raise max_steps to continue"
            )
    if plan.tokenizer_matches_model is False:
        log.warning(
            "%s: its tokenizer differs from the dataset's (%s); the warm start begins from "
            "weights trained on other token ids. Prepare the data with data.tokenizer.base "
            "set to the model directory to keep them aligned.",
            plan.model_source.path,
            dataset_dir / artifacts.TOKENIZER_DIR,
        )
    stored = stored_step(store, run_name) if run_key else None
    if stored is not None:
        # Ray restores this run's own checkpoint, which wins over train.resume_from.
        resume_step = stored
        log.info("continuing %s from its step-%d checkpoint", store.run_uri(run_name), stored)
    planned = time.time()
    emit(
        TrainPlanned(
            workers=plan.world_size,
            global_batch=plan.global_batch,
            tokens_per_step=plan.tokens_per_step,
            max_steps=plan.max_steps,
            precision=plan.precision,
            zero_stage=plan.zero_stage,
            model=plan.model_source.kind,
            resume_step=resume_step,
        )
    )
    # Ray first: a cluster short of `need` fails (or waits, bounded) before an MLflow run exists.
    with (
        ray_session(profile.ray, need),
        _mlflow_run(profile, plan, dict(tags or {})) as (uri, run_id),
    ):
        emit(TrainStarted(run_name=run_name, mlflow_run_id=run_id))
        with _progress_relay(progress) as queue:
            config = loop_config(
                profile,
                plan,
                mlflow={"uri": uri, "run_id": run_id},
                progress_queue=queue,
                fault=fault,
                resume_from=resume,
            )
            result = _fit(profile, plan, config, run_name, store=store)
        checkpoint_uri = _checkpoint_uri(result.checkpoint)
        with _local_checkpoint(result.checkpoint) as ckpt:
            state = json.loads((ckpt / STATE_FILE).read_text())
            history = state["history"]
            # Throughput of this run's own steps; a resumed run's earlier steps were timed before.
            tokens_per_s, loop_s = loop_throughput(history[resume_step:], plan.tokens_per_step)
            startup = state.get("startup", {})
            summary = {
                # Seconds from the end of planning to rank 0 entering the loop (Ray, MLflow,
                # worker processes), then the worker's own start-up phases.
                "startup": {
                    "ray_and_workers_s": startup.pop("worker_entered_at", planned) - planned
                }
                | startup,
                "first_loss": history[0]["loss"],
                "final_loss": history[-1]["loss"],
                "steps": state["step"],
                "tokens": state["tokens"],
                "tokens_per_s": tokens_per_s,
                "loop_s": loop_s,
                # Attempts seen in this run's steps; a resumed run's first attempt is not a restart.
                "restarts": max(
                    0, len({r["attempt"] for r in history if r["step"] > resume_step}) - 1
                ),
                "resumed_from_step": resume_step,
                "global_batch": plan.global_batch,
                "world_size": plan.world_size,
                "data_hash": plan.dataset.content_hash,
                "model_source": plan.model_source.model_dump(mode="json"),  # the registry's base
                "mlflow_run_id": run_id,
                "checkpoint": checkpoint_uri,
            }
            _export(ckpt, dataset_dir, out_dir, summary, profile)
        curve = out_dir / LOSS_CURVE
        subtitle = (
            f"{plan.model_source.kind} model, {plan.world_size} workers x micro {plan.micro_batch} "
            f"x accum {plan.grad_accum}, ZeRO-{plan.zero_stage}, {plan.precision}; "
            f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {state['step']} steps"
        )
        curve.write_text(loss_curve_html(history, f"training loss — {run_name}", subtitle))
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(uri)
        client.log_artifact(run_id, str(curve))
        client.log_artifact(run_id, str(out_dir / artifacts.TRAINING_INFO))
        res = TrainResult(
            model_dir=str(out_dir),
            loss_curve_html=str(curve),
            final_loss=summary["final_loss"],
            first_loss=summary["first_loss"],
            steps=summary["steps"],
            tokens=summary["tokens"],
            tokens_per_s=tokens_per_s,
            loop_s=loop_s,
            restarts=summary["restarts"],
            resumed_from_step=resume_step,
            checkpoint=checkpoint_uri,
            mlflow_run_id=run_id,
            wall_s=time.perf_counter() - t0,
        )
        now_ms = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"summary.{k}", v, now_ms, res.steps) for k, v in res.metrics().items()
            ],
        )
    emit(StageDone("train", res.metrics()))
    return res
