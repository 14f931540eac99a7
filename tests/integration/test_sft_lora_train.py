"""LoRA and SFT through the real training path: Ray Train (2 CPU workers), DeepSpeed on gloo.

The final checkpoint's hf/ is the merged model (what the export, serving and the next warm
start load), adapter/ beside it holds the adapter alone; state.json counts the parameters.
The SFT runs train on the pydoc instruction set as the data stage prepares it (one
loss-masked sample per record, padded per micro-batch).
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


# Instruction samples of the demo set run to ~200 tokens: a wider context, the same tiny model.
SFT = [
    "data.format=instruction",
    "data.block_size=256",
    "model.context=256",
    "data.tokenizer.vocab_size=600",
    "data.split.validation_share=0.1",
]


@pytest.fixture(scope="module")
def dataset(ray_workdir) -> Path:
    return build_dataset(ray_workdir / "ds", block_size=32, vocab_size=512)


@pytest.fixture(scope="module")
def sft_dataset(ray_workdir) -> Path:
    from flywheel.data.stage import prepare

    prepare(load_profile(None, SFT), ray_workdir / "sft-ds")
    return ray_workdir / "sft-ds"


def _history(checkpoint: str) -> list[dict]:
    return json.loads((Path(checkpoint) / "state.json").read_text())["history"]


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


def test_lora_merge_under_zero3_gathers_the_sharded_weights(ray_workdir, sft_dataset):
    """Under ZeRO-3 each rank holds a shard of every weight: the export must gather them
    (rank 0 merges a full copy), so the merged model is exactly base + adapter. On SFT
    samples: padded micro-batches with an attention mask go through the sharded engine."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel.sft.lora import ADAPTER_DIR, load_adapter
    from flywheel.train import train
    from flywheel.train.loop import validation_batches
    from flywheel.train.model import build_model
    from flywheel.train.plan import make_plan

    dataset = sft_dataset
    profile = load_profile(
        None,
        [*TINY, *SFT, "train.zero_stage=3", "train.max_steps=6", "train.checkpoint_every=6"],
    )
    plan = make_plan(profile, dataset)
    assert plan.zero_stage == 3 and plan.dataset.is_sft
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
    rows = pq.read_table(dataset / "validation").to_pylist()[:8]
    (batch,) = validation_batches(rows, 8, plan.dataset.pad_token_id or 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padded
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**inputs).logits, adapted(**inputs).logits, rtol=1e-4, atol=1e-4
        )
    # Steps count real tokens: fewer than the padded positions of a full batch of blocks.
    history = _history(r.checkpoint)
    assert all(0 < h["tokens"] < plan.global_batch * 256 for h in history)
    assert len({h["tokens"] for h in history}) > 1  # samples vary in length


@pytest.fixture(scope="module")
def killed_lora_run(ray_workdir, sft_dataset):
    """A LoRA run on instruction samples whose rank-1 worker is SIGKILLed before step 6.

    Not step 5: rank 0 waits for the step-4 checkpoint to be committed, and rank 1 would
    die inside that wait (the replacement group would then start from scratch)."""
    from flywheel.train import train

    marker = ray_workdir / "lora-fault.json"
    profile = load_profile(
        None,
        [*TINY, *SFT, "train.max_steps=8", "train.checkpoint_every=4", "train.max_failures=1"],
    )
    r = train(
        profile,
        sft_dataset,
        ray_workdir / "model-fault",
        fault={"step": 6, "rank": 1, "marker": str(marker)},
    )
    return r, marker


def test_killed_worker_resumes_a_lora_run(killed_lora_run):
    """SIGKILL one worker mid-run: the replacement group loads the adapter and its optimizer
    state from the DeepSpeed checkpoint (the frozen base is rebuilt, not stored twice)."""
    import os

    from flywheel.sft.lora import ADAPTER_DIR

    r, marker = killed_lora_run
    fired = json.loads(marker.read_text())
    assert (fired["step"], fired["rank"]) == (6, 1)
    with pytest.raises(ProcessLookupError):
        os.kill(fired["pid"], 0)
    assert r.steps == 8 and r.restarts == 1
    state = json.loads((Path(r.checkpoint) / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == list(range(1, 9))
    assert [h["attempt"] for h in state["history"]] == [0] * 4 + [1] * 4
    assert state["method"] == "lora"
    assert (Path(r.checkpoint) / ADAPTER_DIR / "adapter_config.json").exists()


def test_resume_from_continues_an_adapter_run(ray_workdir, sft_dataset, killed_lora_run):
    """train.resume_from on a finished LoRA run's checkpoint: the adapter and its optimizer
    state come back (two more steps move the adapter a little from where it ended, where a
    fresh adapter would start from B = 0) and numbering continues."""
    from safetensors.torch import load_file

    from flywheel.sft.lora import ADAPTER_DIR
    from flywheel.train import train

    first, _ = killed_lora_run
    more = load_profile(
        None,
        [
            *TINY,
            *SFT,
            "train.max_steps=10",
            "train.checkpoint_every=5",
            f"train.resume_from={Path(first.checkpoint).parent}",  # the run dir: latest wins
        ],
    )
    r = train(more, sft_dataset, ray_workdir / "model-resumed")
    assert r.resumed_from_step == 8 and r.steps == 10
    history = _history(r.checkpoint)
    assert [h["step"] for h in history] == list(range(1, 11))
    ended = load_file(Path(first.checkpoint) / ADAPTER_DIR / "adapter_model.safetensors")
    now = load_file(Path(r.checkpoint) / ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = [k for k in ended if "lora_B" in k]
    assert lora_b and sorted(now) == sorted(ended)
    for k in lora_b:
        assert ended[k].abs().max() > 0  # trained: B starts at zero
        drift = (now[k] - ended[k]).norm() / ended[k].norm()
        assert drift < 0.5, (k, float(drift))
    assert (Path(r.checkpoint) / ADAPTER_DIR / "adapter_config.json").exists()
    state = json.loads((Path(r.checkpoint) / "state.json").read_text())
    assert state["method"] == "lora" and state["tokens"] == sum(h["tokens"] for h in history)


def test_full_fine_tune_on_instruction_samples_under_zero3(ray_workdir, sft_dataset):
    """method full, ZeRO-3, on SFT samples: every weight trains on the response tokens, and
    the export gathers the sharded weights into a model that loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.train import train
    from flywheel.train.model import build_model
    from flywheel.train.plan import make_plan

    profile = load_profile(
        None,
        [*TINY_MODEL, *SFT, *tiny_steps(6, checkpoint_every=6, log_every=2), "train.zero_stage=3"],
    )
    r = train(profile, sft_dataset, ray_workdir / "model-full-sft")
    assert r.steps == 6 and r.final_loss < r.first_loss
    history = _history(r.checkpoint)
    # Length-grouped micro-batches: little padding, and throughput counts real tokens only.
    assert all(h["padding"] < 0.3 for h in history), [h["padding"] for h in history]
    assert r.tokens == sum(h["tokens"] for h in history)
    model = AutoModelForCausalLM.from_pretrained(r.model_dir)
    assert model.config.n_positions == 256
    # Gathered, trained weights: full shapes (from_pretrained checks them), moved from init.
    torch.manual_seed(profile.train.seed)
    plan = make_plan(profile, sft_dataset)
    fresh = build_model(profile.model, plan.model_source, plan.dataset)
    moved = model.transformer.h[0].mlp.c_fc.weight - fresh.transformer.h[0].mlp.c_fc.weight
    assert moved.abs().max() > 1e-4
    # The chat template the samples were rendered with ships with the model.
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(r.model_dir).chat_template


def test_cli_data_prepare_on_chat_records(ray_workdir, cli, tmp_path):
    """`flywheel data prepare` on the pydoc set as chat records (the state dir's MLflow
    store exists by now: the ledger entry costs no migrations)."""
    from flywheel import artifacts

    code, out, err = cli(
        "data", "prepare", "--out", tmp_path / "chat", "data.format=chat", *SFT[1:]
    )
    assert code == 0, err
    m = artifacts.DatasetManifest.read(tmp_path / "chat")
    assert m.format == "chat" and m.sequences["train"] > 100
    assert "padding at micro-batch 8" in out
