"""LoRA: targets per architecture checked before workers start, training moves the masked
response loss, the merged model answers exactly as the adapter model, outputs reload."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures_data import pydoc_texts, train_tokenizer

from flywheel.config import LoraConfig, TrainConfig
from flywheel.errors import ConfigError
from flywheel.sft import lora as L
from flywheel.sft import records as R
from flywheel.sft.render import Renderer, collate


def tiny_config(model_type: str, vocab: int = 512):
    from transformers import AutoConfig

    sizes = {
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
        "gpt_neox": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        ),
    }.get(
        model_type,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
        ),
    )
    return AutoConfig.for_model(model_type, vocab_size=vocab, **sizes)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "gpt_neox"])
def test_auto_targets_exist_in_each_architecture(model_type):
    targets = L.check_targets(LoraConfig(), tiny_config(model_type))
    assert targets == L.AUTO_TARGETS[model_type]


def test_auto_covers_attention_and_mlp():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert L.adaptable_modules(model) == set(
        L.AUTO_TARGETS["llama"]
    )  # every projection, not the head


def test_explicit_module_the_model_lacks_is_config_error():
    cfg = LoraConfig(target_modules=["q_proj", "c_attn"])
    with pytest.raises(
        ConfigError, match=r"train\.lora\.target_modules: q_proj not in this gpt2 model"
    ):
        L.check_targets(cfg, tiny_config("gpt2"))
    assert L.check_targets(LoraConfig(target_modules=["c_attn"]), tiny_config("gpt2")) == ["c_attn"]


def test_auto_on_unknown_architecture_asks_for_names():
    with pytest.raises(ConfigError, match=r"train\.lora\.target_modules: auto does not know"):
        L.resolve_targets(LoraConfig(), "falcon", {"query_key_value", "dense"})


def test_empty_target_list_refused_by_the_profile():
    with pytest.raises(ValueError, match="at least one module"):
        LoraConfig(target_modules=[])


@pytest.mark.parametrize(
    ("cuda", "use_gpu", "bnb", "match"),
    [
        (False, True, True, "needs a CUDA device"),
        (True, False, True, "use_gpu"),
        (True, True, False, "bitsandbytes"),
    ],
)
def test_qlora_refused_at_plan_time(cuda, use_gpu, bnb, match):
    train = TrainConfig(method="qlora", scaling={"use_gpu": use_gpu})
    with pytest.raises(ConfigError, match=match):
        L.check_method(train, cuda, bnb)


def test_qlora_accepted_with_cuda_and_lora_anywhere():
    L.check_method(TrainConfig(method="qlora", scaling={"use_gpu": True}), True, True)
    L.check_method(TrainConfig(method="lora"), False, False)


def test_qlora_here_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="qlora needs a CUDA device"):
        L.check_method_here(TrainConfig(method="qlora"))


# ------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(pydoc_texts(200), 512)


@pytest.fixture(scope="module")
def batch(tok):
    renderer = Renderer(tok, 128)
    pairs = [
        ("What does len do?", "Returns the number of items."),
        ("Explain the with statement.", "It wraps a block in a context manager."),
        ("What is a tuple?", "An immutable sequence."),
        ("What does json.dumps do?", "Serializes an object to a JSON string."),
    ]
    samples = [
        renderer(R.Conversation(str(i), (R.Turn("user", q), R.Turn("assistant", a))))
        for i, (q, a) in enumerate(pairs)
    ]
    return collate(samples, tok.pad_token_id)


def build(model_type: str, tok):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, len(tok)))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_lora_trains_merges_and_saves(model_type, tok, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    base = build(model_type, tok)
    base_state = copy.deepcopy(base.state_dict())
    with torch.no_grad():
        base_logits = base.eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits

    model = L.apply_lora(base, LoraConfig(rank=4, alpha=8, dropout=0.0))
    params = L.count_parameters(model)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert params.trainable == lora_params > 0
    assert params.share < 0.2

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss  # the masked response loss: labels are -100 off responses
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    for name, p in model.named_parameters():
        if "lora_" not in name:  # the base stays frozen
            torch.testing.assert_close(
                p.detach(),
                base_state[name.removeprefix("base_model.model.").replace(".base_layer", "")],
            )

    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        adapted = model(**inputs).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapter changed something

    saved = L.save_adapter_and_merged(model, tmp_path, tok)
    assert saved.params == params
    assert saved.adapter_config["r"] == 4 and saved.adapter_config["target_modules"] == sorted(
        L.AUTO_TARGETS[model_type]
    )

    merged = AutoModelForCausalLM.from_pretrained(saved.merged).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)

    fresh = build(model_type, tok)
    fresh.load_state_dict(base_state)
    reloaded = L.load_adapter(fresh, saved.adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
    assert (saved.adapter / "adapter_config.json").exists()
    assert not (saved.adapter / "model.safetensors").exists()  # the adapter alone, not the base


# ------------------------------------------------------------------ plan time


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fixtures_data import build_dataset

    return build_dataset(tmp_path_factory.mktemp("sft-plan") / "ds", block_size=32, vocab_size=512)


def tiny_profile(*overrides):
    from flywheel.config import load_profile

    return load_profile(
        None, ["data.block_size=32", "model.context=32", "model.n_embd=32", *overrides]
    )


def test_plan_refuses_a_target_module_the_model_lacks(dataset):
    from flywheel.train.plan import make_plan

    profile = tiny_profile("train.method=lora", "train.lora.target_modules=[q_proj]")
    with pytest.raises(ConfigError, match=r"train\.lora\.target_modules: q_proj not in this gpt2"):
        make_plan(profile, dataset)
    make_plan(tiny_profile("train.method=lora"), dataset)  # auto fits the fresh GPT-2


def test_plan_refuses_qlora_without_cuda(dataset):
    from flywheel.train.plan import make_plan

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="qlora needs a CUDA device"):
        make_plan(tiny_profile("train.method=qlora"), dataset)


def test_export_from_a_gathered_state_dict(tok, batch, tmp_path):
    """What rank 0 does after training: rebuild the base, load the full PEFT state, merge."""
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(rank=4, alpha=8, dropout=0.0)
    model = L.apply_lora(build("gpt2", tok), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as if trained: B starts at zero
                p.normal_(0, 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = model.eval()(**inputs).logits

    def fresh_base():  # a different init: every base weight must come from `state`
        torch.manual_seed(123)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok)))

    saved = L.export_from_state(fresh_base, cfg, state, tmp_path, merged_name="hf")
    assert (
        saved.merged == tmp_path / "hf"
        and (tmp_path / L.ADAPTER_DIR / "adapter_config.json").exists()
    )
    merged = AutoModelForCausalLM.from_pretrained(saved.merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="does not fit"):
        L.export_from_state(
            fresh_base, LoraConfig(rank=4, target_modules=["c_attn"]), state, tmp_path / "bad"
        )
