"""The per-worker training loop: runs on every Ray Train worker, builds everything from `config`.

`config` is plain data made by `flywheel.train.run` (see `loop_config`): the profile, the
plan (batch sizes, filled DeepSpeed config, dataset facts), where MLflow is, and an
optional fault to inject. Nothing here reads module state a test would have to patch.

A checkpoint is one directory merged by Ray from every worker's report::

    ds/            engine.save_checkpoint (model, optimizer shards, scheduler, step)
    state.json     rank 0: step, tokens, per-step history, attempt
    hf/            final checkpoint only: the model as save_pretrained writes it
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
DS_DIR = "ds"
HF_DIR = "hf"


def _maybe_inject_fault(fault: dict[str, Any] | None, step: int, rank: int) -> None:
    """Kill this worker process (SIGKILL, no clean-up) once, at `fault.step` on `fault.rank`.

    The marker file makes it once per run: the replacement worker sees it and trains on.
    """
    if not fault or step != fault["step"] or rank != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(json.dumps({"pid": os.getpid(), "step": step, "rank": rank}))
    os.kill(os.getpid(), signal.SIGKILL)


def _batches(shard, micro: int, seed: int):
    """Endless micro-batches of packed blocks from this worker's shard, reshuffled per
    epoch, as model inputs (every token is a label: blocks hold no padding)."""
    import numpy as np
    import torch

    epoch = 0
    while True:
        n = 0
        for batch in shard.iter_batches(
            batch_size=micro,
            batch_format="numpy",
            drop_last=True,
            # A local shuffle buffer (a few batches) instead of a global shuffle: the data
            # stage already mixes documents across shards; this breaks up block order.
            local_shuffle_buffer_size=micro * 8,
            local_shuffle_seed=seed + epoch,
        ):
            ids = torch.from_numpy(np.stack(batch["input_ids"]).astype(np.int64))
            n += 1
            yield {"input_ids": ids, "labels": ids}
        if n == 0:
            raise RuntimeError("this worker's dataset shard holds less than one micro batch")
        epoch += 1


# SFT micro-batches are cut from windows of this many micro-batches of shuffled samples,
# sorted by length: padding falls from ~47% (random batches) to ~10% on the demo set.
LENGTH_WINDOW = 16


def group_by_length(samples: list, micro: int, rng) -> tuple[list[list], list]:
    """Micro-batches of similar-length samples from one shuffled window, in random order,
    and the samples left over (fewer than `micro`) for the next window."""
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    full = len(ordered) // micro * micro
    groups = [ordered[i : i + micro] for i in range(0, full, micro)]
    rng.shuffle(groups)
    return groups, ordered[full:]


def _sft_batches(shard, micro: int, seed: int, pad_id: int):
    """Endless micro-batches of SFT samples: padded to the longest in the micro-batch, with
    an attention mask, labels -100 on prompts (from the data stage) and on padding."""
    import random

    from flywheel.sft.render import Sample, collate

    epoch = 0
    left: list[Sample] = []  # fewer than a micro-batch, carried into the next window
    while True:
        n = 0
        rng = random.Random(seed + epoch)
        for batch in shard.iter_batches(
            batch_size=micro * LENGTH_WINDOW,
            batch_format="numpy",
            local_shuffle_buffer_size=micro * LENGTH_WINDOW * 2,
            local_shuffle_seed=seed + epoch,
        ):
            window = left + [
                Sample("", ids.tolist(), labels.tolist())
                for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
            ]
            groups, left = group_by_length(window, micro, rng)
            for group in groups:
                n += 1
                yield collate(group, pad_id)
        if n == 0 and len(left) < micro:
            raise RuntimeError("this worker's dataset shard holds less than one micro batch")
        epoch += 1


class _MlflowBatcher:
    """Rank 0's metric buffer: one `log_batch` every `every` steps, so tracking stays off the
    step's critical path (one SQLite/HTTP round trip per few steps, not per metric)."""

    def __init__(self, uri: str, run_id: str, every: int) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id, self.every = MlflowClient(uri), run_id, every
        self.pending: list = []

    def add(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in values.items()]
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        # log_batch takes at most 1000 metrics per call. A tracking outage must not kill
        # training: keep the metrics (bounded) and try again at the next flush.
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                self.pending = self.pending[1000:]
        except Exception as exc:
            log.warning(
                "MLflow log_batch failed (%s); %d metrics kept for retry", exc, len(self.pending)
            )
            self.pending = self.pending[-100_000:]


def _wait_committed(timeout_s: float = 120.0) -> None:
    """Block until the controller has registered this worker's last report.

    Ray Train v2 registers a reported checkpoint when its controller next polls the workers
    (every 2 s). A worker that dies inside that window loses the checkpoint it just wrote,
    and the replacement group starts from the one before (or from scratch). Waiting here
    costs up to one poll per checkpoint; the final one needs no wait (fit() drains it).
    Only rank 0 waits: the next step's all-reduce holds the other ranks behind it.
    """
    import ray.train

    try:
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s
        )
    except Exception as exc:  # a slow controller must not stop training; it only risks rework
        log.warning("checkpoint not confirmed within %.0f s: %s", timeout_s, exc)


def _model_state_for_export(engine, zero_stage: int, rank: int) -> dict | None:
    """Full weights on rank 0 (None elsewhere under ZeRO-3).

    ZeRO-3 shards every parameter, so every rank joins the gather of each one, through
    DeepSpeed's public `zero.GatheredParameters`, one parameter at a time: no rank holds
    more than one full weight beyond its shards. Tied weights appear once (GPT-2's head is
    its embedding); buffers are not sharded.
    """
    if zero_stage != 3:
        return engine.module.state_dict()
    import deepspeed

    module = engine.module
    keys = set(module.state_dict().keys())  # names only: the tensors are this rank's shards
    state: dict = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().clone().cpu()
    if rank != 0:
        return None
    for name, buf in module.named_buffers():
        if name in keys:  # persistent buffers only, as state_dict has them
            state[name] = buf.detach().clone().cpu()
    return state


def validation_batches(rows: list, micro: int, pad_id: int) -> list[dict]:
    """Model inputs for a validation slice: packed blocks (lists of ids: every token a
    label) or SFT samples (`{"input_ids", "labels"}`: the loss on responses only)."""
    import torch

    from flywheel.sft.render import Sample, collate

    out = []
    for i in range(0, len(rows), micro):
        part = rows[i : i + micro]
        if isinstance(part[0], dict):
            out.append(collate([Sample("", r["input_ids"], r["labels"]) for r in part], pad_id))
        else:
            ids = torch.tensor(part, dtype=torch.long)
            out.append({"input_ids": ids, "labels": ids})
    return out


def _validation_loss(engine, rows: list, micro: int, pad_id: int) -> float:
    """Mean loss (nats per label token) on a fixed validation slice: over every token of
    packed blocks, over the response tokens of SFT samples. Every rank runs the whole slice
    (under ZeRO-3 every rank must join each forward), so all agree on it."""
    import torch

    from flywheel.sft.render import IGNORE_INDEX

    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in validation_batches(rows, micro, pad_id):
            inputs = {k: v.to(engine.device) for k, v in batch.items()}
            # The model's loss is the mean over this batch's label tokens (shifted by one):
            # weighed by their count, every response token counts once in the slice.
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(engine(**inputs).loss.float()) * count
            n += count
    engine.train()
    return total / n if n else float("nan")


def _ask_to_stop(validation: dict[str, Any], step: int, value: float, rank: int, device) -> bool:
    """Rank 0 reports the validation loss to the tuning study and gets its pruner's answer;
    every rank learns it (one broadcast), so the whole group stops at the same step."""
    import torch
    import torch.distributed as dist

    stop = torch.zeros(1, dtype=torch.int32, device=device)
    if rank == 0:
        validation["asks"].put({"step": step, "val_loss": value})
        answer = validation["answers"].get(timeout=validation.get("timeout_s", 300.0))
        stop[0] = int(bool(answer.get("stop")))
    dist.broadcast(stop, src=0)
    return bool(stop.item())


def _with_adapters(model, t) -> tuple[Any, dict[str, int]]:
    """The PEFT model for train.method lora, and its trainable / total parameter counts."""
    from flywheel.errors import ConfigError
    from flywheel.sft.lora import apply_lora, count_parameters

    if t.method == "qlora":  # plan time refuses it without CUDA; the 4-bit load is not wired
        raise ConfigError("train.method: qlora is not wired into the training loop yet")
    model = apply_lora(model, t.lora)
    count = count_parameters(model)
    return model, {"trainable": count.trainable, "total": count.total}


def _export_adapters(profile, plan, weights: dict | None, out: Path) -> None:
    from flywheel.sft.lora import export_from_state
    from flywheel.train.model import build_model

    if weights is None:
        raise RuntimeError("rank 0 holds no gathered weights to export")

    def base():
        return build_model(profile.model, plan.model_source, plan.dataset)

    export_from_state(base, profile.train.lora, weights, out, merged_name=HF_DIR)


def pad_token_id(plan) -> int:
    """The id SFT micro-batches are padded with (masked out: any id in the vocabulary)."""
    d = plan.dataset
    return next((i for i in (d.pad_token_id, d.eos_token_id) if i is not None), 0)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    entered = time.time()
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from flywheel.config import Profile
    from flywheel.runtime.crossing import is_handed, local_model_source, resume_checkpoint
    from flywheel.train.model import build_model
    from flywheel.train.plan import TrainPlan, lr_factor

    profile = Profile.model_validate(config["profile"])
    plan = TrainPlan.model_validate(config["plan"])
    # A model directory handed over as a URI (runtime.crossing) is read from this node's copy.
    if is_handed(plan.model_source.path):
        work = tempfile.mkdtemp(prefix="flywheel-worker-")
        atexit.register(shutil.rmtree, work, True)
        source = local_model_source(plan.model_source, profile.storage.endpoint_url, Path(work))
        plan = plan.model_copy(update={"model_source": source})
    t = profile.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    torch.manual_seed(t.seed)
    model = build_model(profile.model, plan.model_source, plan.dataset)
    params = None
    if t.method != "full":
        model, params = _with_adapters(model, t)
    # betas (0.9, 0.95): the GPT-3/LLaMA setting; steadier than 0.999 at small batches.
    # Only what trains gets optimizer state: under LoRA, the adapters (a few % of weights).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=t.lr,
        betas=(0.9, 0.95),
        weight_decay=t.weight_decay,
    )
    schedule = partial(
        lr_factor, warmup=t.warmup_steps, max_steps=t.max_steps, schedule=t.lr_schedule
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Ray's TorchConfig has already created the process group (gloo or nccl); DeepSpeed
    # adopts it rather than starting its own rendezvous.
    imported = time.time()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=plan.deepspeed
    )
    # Where a worker's start-up goes (seconds), kept with the checkpoint for the benchmark.
    startup = {"import_build_s": imported - entered, "deepspeed_init_s": time.time() - imported}
    device = engine.device

    step, tokens, attempt, history = 0, 0, 0, []
    # A restart inside this run (a worker died) wins over the run we were asked to continue.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        # A path, or a URI where this worker may be on another machine than the driver.
        checkpoint = resume_checkpoint(config["resume_from"], profile.storage.endpoint_url)
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
            engine.load_checkpoint(str(Path(ckpt_dir) / DS_DIR))
        step, tokens, history = state["step"], state["tokens"], state["history"]
        attempt = state.get("attempt", 0) + 1
        if engine.global_steps != step:
            raise RuntimeError(
                f"checkpoint says step {step}, DeepSpeed restored {engine.global_steps}"
            )

    tracker = None
    if rank == 0 and config.get("mlflow"):
        tracker = _MlflowBatcher(config["mlflow"]["uri"], config["mlflow"]["run_id"], t.log_every)
    queue = config.get("progress_queue") if rank == 0 else None
    # Tuning: validation loss on a fixed slice at the study's rungs, which may stop the run.
    validation = config.get("validation")
    report_at = set(validation["at"]) if validation else set()

    def save(final: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="flywheel-ckpt-") as tmp:
            engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=f"step{step}")
            if final:
                weights = _model_state_for_export(engine, plan.zero_stage, rank)
                if rank == 0 and t.method == "full":
                    engine.module.save_pretrained(os.path.join(tmp, HF_DIR), state_dict=weights)
                elif rank == 0:  # hf/ is the merged model (what serving loads), adapter/ beside
                    _export_adapters(profile, plan, weights, Path(tmp))
            if rank == 0:
                state = {
                    "step": step,
                    "tokens": tokens,
                    "attempt": attempt,
                    "startup": startup,
                    "history": history,
                    "method": t.method,
                    "params": params,
                    # ZeRO shards optimizer state per rank: a resume must know how many.
                    "world_size": plan.world_size,
                }
                Path(tmp, STATE_FILE).write_text(json.dumps(state))
            metrics = {
                "step": step,
                "tokens": tokens,
                "loss": history[-1]["loss"] if history else None,
            }
            # Every worker reports its directory (its own ZeRO shards); Ray merges them.
            # Directory names are Ray's (unique per report), so a retried step never collides.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0 and not final:
            _wait_committed()

    sft = plan.dataset.is_sft
    pad_id = pad_token_id(plan)
    shard = ray.train.get_dataset_shard("train")
    # Reshuffle after a restart rather than replay the same order: exact data position is
    # not restored (Ray Data streams), so a restart sees a fresh permutation instead.
    if sft:
        batches = _sft_batches(shard, plan.micro_batch, t.seed + step, pad_id)
    else:
        batches = _batches(shard, plan.micro_batch, t.seed + step)
    first = next(batches)
    startup["restore_first_batch_s"] = time.time() - imported - startup["deepspeed_init_s"]
    startup["worker_entered_at"] = entered
    batches = itertools.chain([first], batches)
    engine.train()
    # Summed over micro-batches, then over ranks in one all-reduce per step:
    # loss, real (non-pad) tokens, positions computed (real + padding).
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    counts = [0, 0]
    tick = time.perf_counter()
    while step < t.max_steps:
        _maybe_inject_fault(config.get("fault"), step + 1, rank)
        lr = scheduler.get_last_lr()[0]
        for _ in range(plan.grad_accum):
            batch = next(batches)
            # SFT: the model's loss is the mean over this micro-batch's response tokens
            # (labels -100 elsewhere), each micro-batch weighed alike (as HF Trainer does).
            loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            sums[0] += loss.detach().to(sums.dtype)  # stays on the device: no sync per micro-step
            mask = batch.get("attention_mask")  # counted on the host copy
            counts[0] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            counts[1] += batch["input_ids"].numel()
        step += 1
        # One small all-reduce per step: the logged loss and token counts are the global
        # batch's, not rank 0's.
        sums[1], sums[2] = counts
        counts = [0, 0]
        dist.all_reduce(sums)
        mean_loss = sums[0].item() / (plan.grad_accum * plan.world_size)
        step_tokens, computed = int(sums[1].item()), int(sums[2].item())
        sums.zero_()
        tokens += step_tokens
        now = time.perf_counter()
        dt, tick = now - tick, now
        norm = engine.get_global_grad_norm()
        row = {
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "step_s": dt,
            # Real tokens only: padding is computed but not learned from.
            "tokens": step_tokens,
            "tokens_per_s": step_tokens / dt,
            "padding": 1 - step_tokens / computed if computed else 0.0,
            "attempt": attempt,
        }
        if rank == 0:
            history.append(row)
            if tracker:
                tracker.add(
                    step, {k: float(row[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s")}
                )
            if queue is not None:
                queue.put_nowait({k: row[k] for k in ("step", "loss", "lr", "tokens_per_s")})
        if validation is not None and step in report_at:
            val = _validation_loss(engine, validation["blocks"], plan.micro_batch, pad_id)
            row["val_loss"] = val
            if tracker:
                tracker.add(step, {"val_loss": val})
            if _ask_to_stop(validation, step, val, rank, device):
                break
        final = step == t.max_steps
        if final or step % t.checkpoint_every == 0:
            save(final)
            tick = time.perf_counter()  # checkpoint time is not step time
    if tracker:
        tracker.flush()
