"""Benchmark: LoRA vs full fine-tuning on the same model, data and steps, in one run.

    flock /tmp/fw-heavy.lock python scripts/bench/bench_lora.py            # CPU, defaults below
    python scripts/bench/bench_lora.py --steps 60 --base-steps 120 train.lora.rank=16

Both runs go through the real train stage (`flywheel.train.train`: Ray Train, DeepSpeed
ZeRO-2, `train.scaling.num_workers` CPU workers on gloo) with the profile's model (a tiny
GPT-2 from configs/local.yaml). Fine-tuning means starting from a trained model, so the run
first trains a base (`--base-steps`, full, from scratch on the same train split; or pass
`--base DIR`), then fine-tunes it twice with everything equal but `train.method`:

  * full   every weight trains (AdamW state for all of them);
  * lora   the base is frozen, rank-r adapters on the "auto" targets train.

Per method: trainable parameters, the training loop's tokens/s (first step excluded),
peak RSS of each Ray Train worker (the kernel's high-water mark, VmHWM, read from
/proc while the worker lives), and the held-out loss of the exported (merged) model on the
validation split, scored here in the driver. Ratios are LoRA / full.

Data (`--data`):
  text   the pydoc topics as packed blocks (tests/fixtures_data.py); loss on every token.
  sft    the pydoc instruction set (flywheel.sft.demo) through the data stage
         (`data.format: instruction`, the base's tokenizer, ChatML, prompt tokens masked);
         the base is pretrained on the text set first; loss on response tokens only.
  DIR    a prepared dataset (an SFT one, with a `labels` column, is scored on responses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine, print_table, write_result  # noqa: E402

from flywheel.config import load_profile  # noqa: E402
from flywheel.train import train  # noqa: E402

METHODS = ("full", "lora")
WORKER_MARK = "RayTrainWorker"  # in the process title Ray gives a Ray Train worker


class WorkerPeaks:
    """Samples the Ray Train workers' peak RSS (VmHWM) while a run is in flight.

    Workers are the local raylet's children, not this process's, so getrusage cannot
    see them. VmHWM is the kernel's own high-water mark, so polling only has to
    catch each worker alive once after its peak (a worker lives for the whole run)."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            # Only this run's workers: the local Ray this process started (raylet and its
            # workers are its descendants), not another job's Ray on the same machine.
            for proc in me.children(recursive=True):
                try:
                    if WORKER_MARK not in " ".join(proc.cmdline()):
                        continue
                except psutil.Error:
                    continue  # exited while we looked
                hwm = _vm_hwm_bytes(proc.pid)
                if hwm is not None:
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), hwm)
            self._stop.wait(self.every_s)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _vm_hwm_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None  # the worker exited between listing and reading
    return None


def held_out_loss(model_dir: str, dataset_dir: Path, max_rows: int) -> tuple[float, str]:
    """Mean loss per scored token of the merged model on the validation split: response
    tokens for an SFT split (labels column), every token of a packed text split."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel import artifacts

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    split = dataset_dir / "validation"
    if "labels" in pq.read_schema(next(split.glob("*.parquet"))).names:
        from transformers import AutoTokenizer

        from flywheel.sft.metrics import response_loss
        from flywheel.sft.prepare import read_samples

        tok = AutoTokenizer.from_pretrained(dataset_dir / artifacts.TOKENIZER_DIR)
        samples = read_samples(split)[:max_rows]
        return response_loss(model, samples, tok.pad_token_id), "response tokens"
    ids = pq.read_table(split, columns=[artifacts.TOKEN_COLUMN]).column(artifacts.TOKEN_COLUMN)
    blocks = torch.tensor(ids.to_pylist()[:max_rows], dtype=torch.long)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), 8):  # equal-length blocks: batch means weigh equally
            batch = blocks[i : i + 8]
            total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    return total / len(blocks), "all tokens"


def sft_dataset(overrides: list[str], base: str, out: Path) -> Path:
    """The pydoc instruction set through the data stage, tokenized with the base's tokenizer."""
    from flywheel.data.stage import prepare

    # ~35 held-out samples of the ~230 records (the default 5% leaves ~10).
    split = "data.split.validation_share=0.15"
    profile = load_profile(
        None, ["data.format=instruction", f"model.base={base}", split, *overrides]
    )
    stats = prepare(profile, out)
    print("sft data: " + ", ".join(f"{k} {v:g}" for k, v in stats.metrics().items()))
    return out


def trainable_params(checkpoint: str, model_dir: str) -> tuple[int, int]:
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    if state.get("params"):  # the adapter methods count on the worker (PEFT model)
        return state["params"]["trainable"], state["params"]["total"]
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    return n, n  # full: every weight trains


def run_method(profile_overrides: list[str], method: str, data: Path, base: str, out: Path):
    profile = load_profile(None, [*profile_overrides, f"train.method={method}"])
    with WorkerPeaks() as peaks:
        r = train(profile, data, out, init_from=base, tags={"trigger_reason": "benchmark"})
    if not peaks.peaks:
        raise RuntimeError(f"no {WORKER_MARK} process seen during the {method} run")
    return r, sorted(peaks.peaks.values())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps per method")
    ap.add_argument("--base-steps", type=int, default=60, help="steps of the base, from scratch")
    ap.add_argument("--base", type=Path, default=None, help="a save_pretrained base model dir")
    ap.add_argument("--data", default="text", help="text | sft | a prepared dataset directory")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (full, lora); medians")
    ap.add_argument("--eval-rows", type=int, default=256, help="validation rows scored")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench_lora.json")
    ap.add_argument("overrides", nargs="*", help="profile overrides, e.g. train.lora.rank=16")
    args = ap.parse_args()

    # Paths the caller gave are the caller's: resolved before the chdir below.
    args.out = args.out.resolve()
    args.base = args.base.resolve() if args.base else None
    if args.data not in ("text", "sft"):
        args.data = str(Path(args.data).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    os.chdir(work)  # the state dir (.flywheel: MLflow, Ray checkpoints) lands here
    common = [f"train.max_steps={args.steps}", "train.checkpoint_every=100000", *args.overrides]
    probe = load_profile(None, common)
    if args.data in ("text", "sft"):
        from fixtures_data import build_dataset

        # The text set is also what the base is pretrained on in sft mode.
        data = build_dataset(
            work / "ds",
            block_size=probe.data.block_size,
            vocab_size=probe.data.tokenizer.vocab_size,
        )
    else:
        data = Path(args.data)
    base = str(args.base) if args.base else None
    base_wall = None
    if base is None:
        t0 = time.perf_counter()
        pre = load_profile(
            None,
            [
                *args.overrides,
                f"train.max_steps={args.base_steps}",
                "train.method=full",
                "train.checkpoint_every=100000",
            ],
        )
        base = train(pre, data, work / "base", tags={"trigger_reason": "benchmark"}).model_dir
        base_wall = time.perf_counter() - t0
        print(f"base: {args.base_steps} steps from scratch in {base_wall:.0f} s -> {base}")
    if args.data == "sft":
        data = sft_dataset(args.overrides, base, work / "sft")
    base_loss, scored = held_out_loss(base, data, args.eval_rows)

    rounds = []
    for i in range(args.repeats):
        entry = {}
        for method in METHODS if i % 2 == 0 else METHODS[::-1]:  # alternate who goes first
            r, rss = run_method(common, method, data, base, work / f"{method}-{i}")
            trainable, total = trainable_params(r.checkpoint, r.model_dir)
            loss, _ = held_out_loss(r.model_dir, data, args.eval_rows)
            entry[method] = {
                "trainable_params": trainable,
                "total_params": total,
                "tokens_per_s": r.tokens_per_s,
                "wall_s": r.wall_s,
                "final_train_loss": r.final_loss,
                "held_out_loss": loss,
                "peak_rss_per_worker_mb": [b / 2**20 for b in rss],
            }
            print(
                f"round {i + 1} {method}: {r.tokens_per_s:,.0f} tok/s, held-out {loss:.3f}, "
                f"peak RSS {', '.join(f'{b / 2**20:.0f}' for b in rss)} MB"
            )
        rounds.append(entry)

    def med(method: str, key: str) -> float:
        return statistics.median(r[method][key] for r in rounds)

    def med_rss(method: str) -> float:
        return statistics.median(max(r[method]["peak_rss_per_worker_mb"]) for r in rounds)

    rows = {
        m: {
            "trainable_params": rounds[0][m]["trainable_params"],
            "total_params": rounds[0][m]["total_params"],
            "tokens_per_s": med(m, "tokens_per_s"),
            "wall_s": med(m, "wall_s"),
            "peak_rss_worker_mb": med_rss(m),
            "held_out_loss": med(m, "held_out_loss"),
        }
        for m in METHODS
    }
    ratios = {k: rows["lora"][k] / rows["full"][k] for k in rows["full"]}

    p = probe
    print(
        f"\nGPT-2 {p.model.n_layer}x{p.model.n_embd}, context {p.model.context}, "
        f"global batch {p.train.effective_global_batch} x {p.data.block_size} tokens, "
        f"{args.steps} steps per method, {p.train.scaling.num_workers} workers, "
        f"ZeRO-{p.train.zero_stage}, LoRA r={p.train.lora.rank} alpha={p.train.lora.alpha}; "
        f"base held-out loss {base_loss:.3f} ({scored}); medians of {args.repeats} round(s)"
    )
    cols = [
        ("trainable params", "trainable_params", "{:,.0f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("wall s", "wall_s", "{:.1f}"),
        ("peak RSS/worker MB", "peak_rss_worker_mb", "{:,.0f}"),
        ("held-out loss", "held_out_loss", "{:.3f}"),
    ]
    table = [(m, [f.format(rows[m][k]) for _, k, f in cols]) for m in METHODS]
    table.append(("lora / full", [f"{ratios[k]:.3f}" for _, k, _ in cols]))
    print_table("method", [c for c, _, _ in cols], table)

    result = {
        "machine": machine(),
        "overrides": common,
        "steps": args.steps,
        "base": {"path": base, "steps": None if args.base else args.base_steps},
        "base_wall_s": base_wall,
        "base_held_out_loss": base_loss,
        "data": args.data,
        "scored": scored,
        "rows": rows,
        "ratios_lora_over_full": ratios,
        "rounds": rounds,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
