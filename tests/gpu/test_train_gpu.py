"""Training on a CUDA device: bf16, NCCL, ZeRO-2 and ZeRO-3 (skipped without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_data import build_dataset

from flywheel.config import load_profile

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_on_one_gpu(state_dir, tmp_path, stage):
    from flywheel.train import make_plan, train

    ds = build_dataset(tmp_path / "ds", block_size=64, vocab_size=512)
    profile = load_profile(
        None,
        [
            "data.block_size=64",
            "model.context=64",
            "model.n_embd=128",
            "model.n_head=4",
            "train.micro_batch_size=16",
            "train.max_steps=30",
            "train.checkpoint_every=10",
            "train.scaling.use_gpu=true",
            "train.scaling.num_workers=1",
            f"train.zero_stage={stage}",
        ],
    )
    plan = make_plan(profile, ds)
    assert (plan.precision, plan.backend) == ("bf16", "nccl")
    assert plan.deepspeed["bf16"]["enabled"] is True
    r = train(profile, ds, tmp_path / "model")
    assert r.steps == 30 and r.final_loss < r.first_loss - 0.5
    config = json.loads((Path(r.model_dir) / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(r.model_dir)
    assert model.get_input_embeddings().num_embeddings == 512
