"""QLoRA on one CUDA device: a 4-bit (bitsandbytes NF4) frozen base, bf16 adapters, ZeRO-2.

Skipped without a CUDA device (tests/conftest.py) or without bitsandbytes (QLoRA is refused
at plan time there: tests/unit/test_sft_lora.py). The base is a small Llama-style model
trained here first (full, bf16): QLoRA adapts a trained base, and Llama's projections are
plain nn.Linear, the layers bitsandbytes quantizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_data import build_dataset

from flywheel.config import load_profile

pytestmark = pytest.mark.gpu
pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")

GPU = [
    "model.arch=llama",
    "data.block_size=64",
    "model.context=64",
    "model.n_layer=2",
    "model.n_embd=128",
    "model.n_head=4",
    "train.micro_batch_size=16",
    "train.checkpoint_every=1000",
    "train.scaling.use_gpu=true",
    "train.scaling.num_workers=1",
    "train.zero_stage=2",
]


def _held_out_loss(model_dir: str, dataset: Path) -> float:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    ids = pq.read_table(dataset / "validation").column("input_ids").to_pylist()[:64]
    batch = torch.tensor(ids, dtype=torch.long, device="cuda")
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


# Strict: the day the loop loads the 4-bit base, this passes and the marker must go.
@pytest.mark.xfail(
    strict=True,
    raises=Exception,
    reason="train.method qlora is refused by the training loop: the 4-bit base load is not "
    "wired yet (flywheel/train/loop.py _with_adapters); no GPU was lent to build it on",
)
def test_qlora_bf16_on_one_gpu_trains_adapters_on_a_4bit_base(state_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from flywheel.sft.lora import ADAPTER_DIR
    from flywheel.train import make_plan, train

    ds = build_dataset(tmp_path / "ds", block_size=64, vocab_size=512)
    base = train(
        load_profile(None, [*GPU, "train.max_steps=40", "train.method=full"]),
        ds,
        tmp_path / "base",
    ).model_dir
    profile = load_profile(
        None,
        [
            *GPU,
            f"model.base={base}",
            "model.warm_start=false",
            "train.method=qlora",
            "train.lr=5e-3",
            "train.max_steps=30",
            "train.lora.rank=8",
        ],
    )
    plan = make_plan(profile, ds)
    assert (plan.precision, plan.backend, plan.model_source.kind) == ("bf16", "nccl", "base")

    r = train(profile, ds, tmp_path / "model")
    assert r.steps == 30 and r.final_loss < r.first_loss
    state = json.loads((Path(r.checkpoint) / "state.json").read_text())
    assert state["method"] == "qlora"
    # Only the adapters train: a few percent of the weights.
    assert 0 < state["params"]["trainable"] < state["params"]["total"] / 10
    adapter = json.loads((Path(r.model_dir) / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == 8

    # The merged model is plain transformers (dequantized base + adapter: no PEFT, no 4-bit
    # layers) and it learned: the held-out loss is below its base's.
    merged = AutoModelForCausalLM.from_pretrained(r.model_dir)
    assert not any("lora" in k for k in merged.state_dict())
    assert "quantization_config" not in json.loads((Path(r.model_dir) / "config.json").read_text())
    assert _held_out_loss(r.model_dir, ds) < _held_out_loss(base, ds)
