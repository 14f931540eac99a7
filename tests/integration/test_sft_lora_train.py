"""LoRA through the real training path: Ray Train (2 CPU workers), DeepSpeed ZeRO-2 on gloo.

The final checkpoint's hf/ is the merged model (what the export, serving and the next warm
start load), adapter/ beside it holds the adapter alone; state.json counts the parameters.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from fixtures_data import TINY_MODEL, build_dataset, tiny_steps

from flywheel.config import load_profile

pytestmark = pytest.mark.integration

TINY = [
    *TINY_MODEL,
    *tiny_steps(16, checkpoint_every=8, log_every=4),
    "train.lr=1e-2",
    "train.method=lora",
    "train.lora.rank=4",
    "train.lora.alpha=8",
    "train.lora.dropout=0",
]


@pytest.fixture(scope="module")
def dataset(ray_workdir) -> Path:
    return build_dataset(ray_workdir / "ds", block_size=32, vocab_size=512)


def test_lora_run_under_zero2_trains_adapters_only_and_exports_merged(ray_workdir, dataset):
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel.sft.lora import ADAPTER_DIR, AUTO_TARGETS
    from flywheel.train import train
    from flywheel.train.model import build_model
    from flywheel.train.plan import make_plan

    profile = load_profile(None, TINY)
    plan = make_plan(profile, dataset)
    assert plan.zero_stage == 2
    r = train(profile, dataset, ray_workdir / "model")
    assert r.steps == 16

    ckpt = Path(r.checkpoint)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["method"] == "lora"
    assert 0 < state["params"]["trainable"] < state["params"]["total"] / 5
    adapter = json.loads((ckpt / ADAPTER_DIR / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(AUTO_TARGETS["gpt2"]) and adapter["r"] == 4

    merged = AutoModelForCausalLM.from_pretrained(r.model_dir)
    assert not any("lora" in k for k in merged.state_dict())
    # The base was frozen: the embedding is the seed's fresh one; the adapted layers moved.
    torch.manual_seed(profile.train.seed)  # as each worker does before building the model
    fresh = build_model(profile.model, plan.model_source, plan.dataset)
    torch.testing.assert_close(merged.transformer.wte.weight, fresh.transformer.wte.weight)
    moved = merged.transformer.h[0].attn.c_attn.weight - fresh.transformer.h[0].attn.c_attn.weight
    assert moved.abs().max() > 1e-4

    # The merged model is the base plus the adapter, and it learned: a fixed held-out slice
    # scores better than the fresh base (a frozen random base moves little in 16 steps).
    import pyarrow.parquet as pq

    from flywheel.sft.lora import load_adapter

    ids = torch.tensor(pq.read_table(dataset / "validation").column("input_ids").to_pylist()[:64])
    adapted = load_adapter(copy.deepcopy(fresh), ckpt / ADAPTER_DIR)
    with torch.no_grad():
        merged_out = merged.eval()(input_ids=ids, labels=ids)
        torch.testing.assert_close(
            adapted.eval()(input_ids=ids).logits, merged_out.logits, rtol=1e-4, atol=1e-4
        )
        fresh_loss = fresh.eval()(input_ids=ids, labels=ids).loss.item()
    assert merged_out.loss.item() < fresh_loss - 0.02, (merged_out.loss.item(), fresh_loss)


def test_lora_merge_under_zero3_gathers_the_sharded_weights(ray_workdir, dataset):
    """Under ZeRO-3 each rank holds a shard of every weight: the export must gather them
    (rank 0 merges a full copy), so the merged model is exactly base + adapter."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel.sft.lora import ADAPTER_DIR, load_adapter
    from flywheel.train import train
    from flywheel.train.model import build_model
    from flywheel.train.plan import make_plan

    profile = load_profile(
        None, [*TINY, "train.zero_stage=3", "train.max_steps=6", "train.checkpoint_every=6"]
    )
    plan = make_plan(profile, dataset)
    assert plan.zero_stage == 3
    r = train(profile, dataset, ray_workdir / "model-z3")
    assert r.steps == 6

    merged = AutoModelForCausalLM.from_pretrained(r.model_dir).eval()
    torch.manual_seed(profile.train.seed)
    fresh = build_model(profile.model, plan.model_source, plan.dataset)
    # Shapes are full (not shards) and the frozen embedding is the base's.
    torch.testing.assert_close(merged.transformer.wte.weight, fresh.transformer.wte.weight)
    adapted = load_adapter(fresh, Path(r.checkpoint) / ADAPTER_DIR).eval()
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained (B starts at zero)
    ids = torch.tensor(pq.read_table(dataset / "validation").column("input_ids").to_pylist()[:16])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_killed_worker_resumes_a_lora_run(ray_workdir, dataset):
    """SIGKILL one worker mid-run: the replacement group loads the adapter and its optimizer
    state from the DeepSpeed checkpoint (the frozen base is rebuilt, not stored twice)."""
    import os

    from flywheel.sft.lora import ADAPTER_DIR
    from flywheel.train import train

    marker = ray_workdir / "lora-fault.json"
    profile = load_profile(
        None, [*TINY, "train.max_steps=12", "train.checkpoint_every=4", "train.max_failures=1"]
    )
    r = train(
        profile,
        dataset,
        ray_workdir / "model-fault",
        fault={"step": 7, "rank": 1, "marker": str(marker)},
    )
    fired = json.loads(marker.read_text())
    assert (fired["step"], fired["rank"]) == (7, 1)
    with pytest.raises(ProcessLookupError):
        os.kill(fired["pid"], 0)
    assert r.steps == 12 and r.restarts == 1
    state = json.loads((Path(r.checkpoint) / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == list(range(1, 13))
    assert [h["attempt"] for h in state["history"]] == [0] * 4 + [1] * 8
    assert state["method"] == "lora"
    assert (Path(r.checkpoint) / ADAPTER_DIR / "adapter_config.json").exists()
