"""LoRA adapters with PEFT: which modules, checked before workers start; merge and save.

`train.lora.target_modules: auto` adapts the attention and MLP projections of the
architecture (the QLoRA paper's finding: adapting every linear layer, not only the
attention's q/v, is what matches full fine-tuning). An explicit list is checked against
the model's own module names on a meta-device copy (no weights allocated), so a typo is a
ConfigError naming `train.lora.target_modules` before any worker starts: PEFT itself fails
only when *no* name matches and silently skips the others.

Outputs: the adapter on its own (`ADAPTER_DIR`, PEFT's `save_pretrained`: small, loads onto
the same base) and the merged model (`MERGED_DIR`, plain transformers `save_pretrained`:
what serving and the next warm start load, with no PEFT at inference).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.config import LoraConfig, TrainConfig
from flywheel.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

# Contract with the registry and serving steps: where a LoRA run's outputs lie.
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Attention and MLP projections per `config.model_type`. GPT-2's c_proj is both the
# attention output and the MLP down projection; PEFT matches it in both places.
AUTO_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# Architectures whose projections are transformers' Conv1D (weights stored transposed).
_FAN_IN_FAN_OUT = {"gpt2"}


def check_method(train: TrainConfig, cuda_available: bool, bitsandbytes_installed: bool) -> None:
    """QLoRA's 4-bit base needs bitsandbytes on CUDA: refuse it at plan time elsewhere."""
    if train.method != "qlora":
        return
    if not cuda_available:
        raise ConfigError(
            "train.method: qlora needs a CUDA device (bitsandbytes 4-bit) and this machine "
            "has none; use train.method=lora"
        )
    if not train.scaling.use_gpu:
        raise ConfigError("train.method: qlora runs on GPU workers; set train.scaling.use_gpu=true")
    if not bitsandbytes_installed:
        raise ConfigError("train.method: qlora needs bitsandbytes (pip install bitsandbytes)")


def check_method_here(train: TrainConfig) -> None:
    """`check_method` for the machine this runs on."""
    import importlib.util

    import torch

    check_method(
        train, torch.cuda.is_available(), importlib.util.find_spec("bitsandbytes") is not None
    )


def adaptable_modules(model: nn.Module) -> set[str]:
    """Last names of the layers LoRA can adapt (Linear, transformers' Conv1D), less the head."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = getattr(model, "get_output_embeddings", None)
    out_head = head() if callable(head) else None
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not out_head
    }


def resolve_targets(cfg: LoraConfig, model_type: str, available: Iterable[str]) -> list[str]:
    """The module names to adapt; a name the model lacks is a ConfigError naming the field."""
    have = set(available)
    if cfg.target_modules == "auto":
        if model_type not in AUTO_TARGETS:
            raise ConfigError(
                f"train.lora.target_modules: auto does not know model type '{model_type}' "
                f"(knows {', '.join(sorted(AUTO_TARGETS))}); name its modules "
                f"(this model has: {', '.join(sorted(have))})"
            )
        wanted = AUTO_TARGETS[model_type]
    else:
        wanted = list(cfg.target_modules)
    missing = [m for m in wanted if m not in have]
    if missing:
        raise ConfigError(
            f"train.lora.target_modules: {', '.join(missing)} not in this {model_type} model "
            f"(its adaptable modules: {', '.join(sorted(have))})"
        )
    return wanted


def check_targets(cfg: LoraConfig, model_config: PretrainedConfig) -> list[str]:
    """`resolve_targets` on a meta-device model built from `model_config`: no memory, no
    weights read, so it runs at plan time for any size of model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return resolve_targets(cfg, model_config.model_type, adaptable_modules(skeleton))


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> Any:
    """The PEFT model: base weights frozen, adapters on the resolved target modules."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model_type = model.config.model_type
    targets = resolve_targets(cfg, model_type, adaptable_modules(model))
    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=model_type in _FAN_IN_FAN_OUT,
    )
    return get_peft_model(model, peft_cfg)


def load_adapter(base: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> Any:
    """A saved adapter on its base (warm start from a base plus a champion's adapter)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    # Tied weights (GPT-2's head and embedding) are one tensor: count each once.
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamCount(trainable, total)


@dataclass(frozen=True)
class SavedLora:
    adapter: Path
    merged: Path
    params: ParamCount
    adapter_config: dict[str, Any]


def adapter_config(peft_model: Any) -> dict[str, Any]:
    """The active adapter's settings as plain values (for MLflow params/tags)."""
    cfg = peft_model.peft_config[peft_model.active_adapter]
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
        "base_model": peft_model.base_model.model.config.name_or_path or "",
    }


def save_adapter_and_merged(
    peft_model: Any, out: Path, tokenizer: Any = None, merged_name: str = MERGED_DIR
) -> SavedLora:
    """Save the adapter, then merge it into the base and save that (with the tokenizer).

    The merge happens in place (`merge_and_unload`), so the adapter is written first and
    `peft_model` must not be trained further afterwards. Under ZeRO-3 the caller gathers
    the parameters before this (each rank holds only a shard).
    """
    out = Path(out)
    params = count_parameters(peft_model)
    config = adapter_config(peft_model)
    peft_model.save_pretrained(out / ADAPTER_DIR)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out / merged_name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / merged_name)
        tokenizer.save_pretrained(out / ADAPTER_DIR)
    return SavedLora(out / ADAPTER_DIR, out / merged_name, params, config)


def export_from_state(
    build: Any, cfg: LoraConfig, state: dict[str, Any], out: Path, merged_name: str = MERGED_DIR
) -> SavedLora:
    """Adapter and merged model from a full PEFT state dict (rank 0, after training).

    `build()` makes the base model again; the trained weights are loaded into a fresh PEFT
    copy, which is merged and saved. The training engine's own module is left alone: under
    ZeRO-3 it holds only this rank's shards, and merging it in place would change what the
    engine still references. The cost is one more copy of the model on rank 0.
    """
    model = apply_lora(build(), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (GPT-2's head is its embedding) may be absent from a state dict.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"trained state does not fit the model: {missing[:3]} {unexpected[:3]}")
    return save_adapter_and_merged(model, out, merged_name=merged_name)
