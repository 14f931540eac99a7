"""Build the causal LM a run starts from: a directory/hub id, or a fresh GPT-2/Llama; and
the warm start from a base plus the champion's adapter (`champion_on_base`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.config import ModelConfig, Profile

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from flywheel.registry import Registry
    from flywheel.train.plan import DatasetInfo, ModelSource


def fresh_config(cfg: ModelConfig, data: DatasetInfo) -> PretrainedConfig:
    """A transformers config for a model built from the profile's architecture fields.

    Dropout is 0: these runs see each token about once, where dropout only slows the
    loss down (the nanoGPT/Chinchilla pretraining setting).
    """
    from transformers import GPT2Config, LlamaConfig

    common: dict[str, Any] = {
        "vocab_size": data.vocab_size,
        "bos_token_id": data.eos_token_id,
        "eos_token_id": data.eos_token_id,
        "pad_token_id": data.pad_token_id,
    }
    if cfg.arch == "gpt2":
        return GPT2Config(
            n_positions=cfg.context,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    return LlamaConfig(
        hidden_size=cfg.n_embd,
        # SwiGLU's usual 8/3 x width, rounded up to a multiple of 32 for friendlier GEMMs.
        intermediate_size=-(-8 * cfg.n_embd // 3 // 32) * 32,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=True,
        **common,
    )


def build_model(cfg: ModelConfig, source: ModelSource, data: DatasetInfo) -> PreTrainedModel:
    """The model in fp32 (DeepSpeed casts for bf16); identical on every rank for a seed."""
    import torch
    from transformers import AutoModelForCausalLM

    if source.kind == "fresh":
        return AutoModelForCausalLM.from_config(fresh_config(cfg, data))
    # make_plan checked that the vocabulary and positions cover the dataset.
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)


def champion_on_base(profile: Profile, registry: Registry) -> Path:
    """`model.warm_start_from: adapter`: `model.base` plus the champion's LoRA adapter,
    merged into a save_pretrained directory (with the base's tokenizer) that a warm start
    loads like any model directory.

    Cached under the registry cache by champion version and base, so the data stage (which
    reads its tokenizer) and the train stage build it once. A champion without an adapter
    (a full fine-tune) is the profile's error.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.errors import ConfigError
    from flywheel.registry import CHAMPION, NotFoundError, resolve_model_source
    from flywheel.registry.packaging import build_cached, safe_name
    from flywheel.sft.lora import load_adapter

    base = profile.model.base
    if not base:
        raise ConfigError("model.warm_start_from: adapter needs model.base (the adapter's base)")
    info = registry.version(CHAMPION)
    try:
        adapter = registry.download_adapter(CHAMPION)
    except NotFoundError as exc:
        raise ConfigError(
            f"model.warm_start_from: adapter: {exc}; use merged (the champion's weights)"
        ) from None
    cache = profile.state_path("registry-cache", safe_name(registry.name))

    def merge(staging: Path) -> Path:
        base_dir = resolve_model_source(base, profile)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = load_adapter(model, adapter).merge_and_unload()
        out = staging / "model"
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
        return out

    return build_cached(cache / f"v{info.version}-on-{safe_name(base)}", info.version, merge)
