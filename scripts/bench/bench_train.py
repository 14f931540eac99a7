"""Benchmark: training throughput of DeepSpeed on Ray Train vs a plain PyTorch loop.

    python scripts/bench/bench_train.py                  # CPU: the local profile's model, 60 steps
    python scripts/bench/bench_train.py --steps 120 --repeats 2
    python scripts/bench/bench_train.py --gpu            # bf16, ZeRO-2, 16x768 GPT-2 (120M), MFU

Same model (a fresh GPT-2 from the profile), same global batch, same packed blocks, same
optimizer (AdamW 0.9/0.95) and LR schedule, in one run:

  * baseline   one process, `model(ids).loss.backward(); opt.step()`, the whole global batch
               per step (on CPU: all of the machine's torch threads);
  * flywheel   `flywheel.train.train`: Ray Train TorchTrainer x `train.scaling.num_workers`,
               DeepSpeed ZeRO (gloo on CPU, NCCL on GPU), each worker a share of the batch.

Two ratios: the training loop's tokens/s (first step of each left out in both), and end to
end (tokens / wall time, which for flywheel includes Ray and DeepSpeed start-up, MLflow,
checkpoints and the export). GPU mode adds MFU = 6 * params * tokens/s / peak FLOP/s.

Data: `--data DIR` (a prepared dataset) or, by default, a dataset built on the fly from the
pydoc topics (tests/fixtures_data.py) with the profile's block size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine, print_table, write_result  # noqa: E402

from flywheel.config import Profile, load_profile  # noqa: E402
from flywheel.train import make_plan, train  # noqa: E402
from flywheel.train.model import build_model  # noqa: E402
from flywheel.train.plan import lr_factor  # noqa: E402

# bf16 dense peak of the accelerator (FLOP/s) for MFU; H100/H200 SXM: 989 TFLOP/s.
DEFAULT_PEAK_TFLOPS = 989.0

GPU_OVERRIDES = [
    # GPT-2 small's width and heads with 16 layers: 120M parameters with the 8k BPE trained
    # here (GPT-2 small itself is 124M, 39M of it the 50k-token embedding).
    "model.n_layer=16",
    "model.n_head=12",
    "model.n_embd=768",
    "model.context=512",
    "data.block_size=512",
    "train.micro_batch_size=16",
    "train.scaling.num_workers=1",
    "train.scaling.use_gpu=true",
    "train.zero_stage=2",
    "train.lr=6e-4",
    "train.checkpoint_every=1000",
]


def load_blocks(dataset_dir: Path, n: int):
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from flywheel import artifacts

    table = pq.ParquetDataset(artifacts.split_files(dataset_dir, "train")).read(
        columns=["input_ids"]
    )
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
    # Shuffled like the Ray path's local shuffle: consecutive blocks come from one document,
    # and a loop over them in file order learns visibly slower.
    ids = ids[np.random.default_rng(0).permutation(len(ids))]
    reps = math.ceil(n / len(ids))
    return torch.from_numpy(np.concatenate([ids] * reps)[:n])


def baseline(profile: Profile, dataset_dir: Path, steps: int, device: str, threads: int) -> dict:
    """The plain single-process loop: the cost floor Ray + DeepSpeed are compared with."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    plan = make_plan(profile, dataset_dir)
    torch.manual_seed(profile.train.seed)
    model = build_model(profile.model, plan.model_source, plan.dataset).to(device)
    t = profile.train
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        partial(lr_factor, warmup=t.warmup_steps, max_steps=t.max_steps, schedule=t.lr_schedule),
    )
    blocks = load_blocks(dataset_dir, steps * plan.global_batch)
    bf16 = plan.precision == "bf16"
    times, losses = [], []
    for step in range(steps):
        tick = time.perf_counter()
        ids = blocks[step * plan.global_batch : (step + 1) * plan.global_batch].to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() syncs a GPU, so the step time is real
        times.append(time.perf_counter() - tick)
    steady = times[1:] or times
    return {
        "tokens_per_s": len(steady) * plan.tokens_per_step / sum(steady),
        "wall_s": time.perf_counter() - t0,
        "tokens": steps * plan.tokens_per_step,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


def flywheel_run(profile: Profile, dataset_dir: Path, out: Path) -> dict:
    r = train(profile, dataset_dir, out, tags={"trigger_reason": "benchmark"})
    info = json.loads((out / "flywheel_training.json").read_text())["summary"]
    return {
        "tokens_per_s": r.tokens_per_s,
        "wall_s": r.wall_s,
        "tokens": r.tokens,
        "first_loss": r.first_loss,
        "final_loss": r.final_loss,
        "loop_s": r.loop_s,
        "startup": info.get("startup", {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpu", action="store_true", help="bf16, ZeRO-2, 120M-parameter GPT-2 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (CPU 60, GPU 50)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds of (baseline, flywheel); medians shown"
    )
    ap.add_argument(
        "--data", type=Path, default=None, help="a prepared dataset (default: built here)"
    )
    ap.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench_train.json")
    ap.add_argument("overrides", nargs="*", help="profile overrides, e.g. train.micro_batch_size=4")
    args = ap.parse_args()

    steps = args.steps or (50 if args.gpu else 60)
    overrides = [*(GPU_OVERRIDES if args.gpu else []), f"train.max_steps={steps}", *args.overrides]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    os.chdir(work)  # the state dir (.flywheel: MLflow, Ray checkpoints) lands here
    profile = load_profile(None, overrides)
    device = "cuda" if args.gpu else "cpu"
    data = args.data
    if data is None:
        from fixtures_data import build_dataset

        vocab = 8192 if args.gpu else profile.data.tokenizer.vocab_size
        data = build_dataset(work / "ds", block_size=profile.data.block_size, vocab_size=vocab)

    # On CPU two baselines: one torch thread (what each Ray worker gets: Ray sets
    # OMP_NUM_THREADS to the worker's CPUs) and all cores. On a loaded machine a multi-threaded
    # loop suffers most (every parallel region waits for its slowest, descheduled thread).
    cores = os.cpu_count() or 1
    baselines = {"baseline": cores} if args.gpu else {"baseline-1t": 1, f"baseline-{cores}t": cores}
    rounds = []
    for i in range(args.repeats):
        entry = {name: baseline(profile, data, steps, device, n) for name, n in baselines.items()}
        entry["flywheel"] = flywheel_run(profile, data, work / f"model-{i}")
        rounds.append(entry)
        print(
            f"round {i + 1}: "
            + ", ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s" for k, v in entry.items())
        )

    def med(key: str, which: str) -> float:
        return statistics.median(r[which][key] for r in rounds)

    params = rounds[0][next(iter(baselines))]["params"]
    rows = []
    for which in [*baselines, "flywheel"]:
        tps, wall = med("tokens_per_s", which), med("wall_s", which)
        row = {"path": which, "loop_tokens_per_s": tps, "wall_s": wall}
        row["e2e_tokens_per_s"] = rounds[0][which]["tokens"] / wall
        for ref in baselines:  # ratios against each baseline
            row[f"loop_x_{ref}"] = tps / med("tokens_per_s", ref)
            row[f"e2e_x_{ref}"] = med("wall_s", ref) / wall
        if args.gpu:
            row["mfu"] = 6 * params * tps / (args.peak_tflops * 1e12)
        rows.append(row)

    p = profile
    print(
        f"\n{'GPU' if args.gpu else 'CPU'}: GPT-2 {p.model.n_layer}x{p.model.n_embd}, "
        f"{params / 1e6:.1f}M params, global batch {p.train.effective_global_batch} x "
        f"{p.data.block_size} tokens, {steps} steps, {p.train.scaling.num_workers} workers, "
        f"ZeRO-{p.train.zero_stage}; medians of {args.repeats} rounds"
    )
    cols = ["loop tok/s", *(f"loop x {b}" for b in baselines), "wall s", "e2e tok/s"]
    cols += [f"e2e x {b}" for b in baselines] + (["MFU"] if args.gpu else [])
    table = []
    for r in rows:
        vals = [f"{r['loop_tokens_per_s']:,.0f}", *(f"{r[f'loop_x_{b}']:.2f}" for b in baselines)]
        vals += [f"{r['wall_s']:.1f}", f"{r['e2e_tokens_per_s']:,.0f}"]
        vals += [f"{r[f'e2e_x_{b}']:.2f}" for b in baselines] + (
            [f"{r['mfu']:.1%}"] if args.gpu else []
        )
        table.append((r["path"], vals))
    print_table("path", cols, table)
    fly0 = rounds[-1]["flywheel"]
    print(
        f"flywheel start-up (last round): {json.dumps({k: round(v, 1) for k, v in fly0['startup'].items()})}"
    )

    result = {
        "mode": "gpu" if args.gpu else "cpu",
        "machine": machine(),
        "overrides": overrides,
        "params": params,
        "steps": steps,
        "rows": rows,
        "rounds": rounds,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
