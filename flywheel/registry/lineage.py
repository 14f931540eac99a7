"""What a registered version carries: the tag names two sides must agree on, the lineage
tags of a candidate and what it was trained as. No MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel import contracts
from flywheel.sft.lora import ADAPTER_DIR

if TYPE_CHECKING:
    from flywheel.evaluate.report import EvalReport
    from flywheel.gate import Decision

CHAMPION = contracts.CHAMPION
CHALLENGER = contracts.CHALLENGER
LATEST = "latest"
MODEL_ARTIFACT = "model"
CARD_ARTIFACT = "model_card.md"
# A LoRA run's adapter: logged as this artifact of the version's run (next to MODEL_ARTIFACT).
ADAPTER_ARTIFACT = ADAPTER_DIR
# Lineage tag keys on each version, as the pipeline writes them (`lineage_tags` builds
# them); plain keys so any MLflow client reads `training_run_id` without knowing flywheel.
TAG_DATA_HASH = "data_manifest_hash"
TAG_TRAINING_RUN = contracts.TRAINING_RUN_ID
TAG_PIPELINE_RUN = "pipeline_run_id"
TAG_TRIGGER = "trigger_reason"
TAG_VERDICT = contracts.VERDICT
TAG_REASONS = "verdict_reasons"
METRIC_PREFIX = contracts.CHALLENGER_PREFIX  # EvalReport.metrics(...) at registration
DELTA_PREFIX = contracts.DELTA_PREFIX
# Tags flywheel itself maintains.
TAG_FLAVOR = "flywheel.flavor"
TAG_REGISTERED_BY = "flywheel.registered_by"
REGISTERED_BY_FLYWHEEL = "flywheel"
# The pair that identifies one candidate: a retried gate step carries the same two.
CANDIDATE_KEYS = (TAG_PIPELINE_RUN, TAG_TRAINING_RUN)
# SQL-backed stores cap registered-model tags and descriptions at 5,000 characters.
MAX_TEXT = 4900


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"


def lineage_tags(
    *,
    data_hash: str | None = None,
    training_run_id: str | None = None,
    pipeline_run_id: str | None = None,
    trigger_reason: str | None = None,
    report: EvalReport | None = None,
    decision: Decision | None = None,
) -> dict[str, str]:
    """The lineage tags of a candidate version, for `Registry.register_candidate`."""
    tags = {
        TAG_DATA_HASH: data_hash or (report.data_hash if report else None),
        TAG_TRAINING_RUN: training_run_id,
        TAG_PIPELINE_RUN: pipeline_run_id,
        TAG_TRIGGER: trigger_reason,
    }
    out = {k: str(v) for k, v in tags.items() if v}
    if report is not None:
        out.update({k: f"{v:.6g}" for k, v in report.metrics(METRIC_PREFIX).items()})
    if decision is not None:
        out[TAG_VERDICT] = decision.verdict
        out[TAG_REASONS] = clip(json.dumps(decision.reasons))
        out.update({f"{DELTA_PREFIX}{k}": f"{v:.6g}" for k, v in decision.deltas.items()})
    return out


def candidate_identity(tags: dict[str, str]) -> dict[str, str] | None:
    """The tags that make a registration the same candidate again, or None when the caller
    gave no identity (then every registration is a new candidate)."""
    if not all(tags.get(k) for k in CANDIDATE_KEYS):
        return None
    return {k: str(tags[k]) for k in CANDIDATE_KEYS}


# What a version was trained as (from its model directory), for a reader comparing versions.
TAG_METHOD = "flywheel.method"
TAG_BASE_MODEL = "flywheel.base_model"
TAG_PARAMS_TRAINABLE = "flywheel.params.trainable"
TAG_PARAMS_TOTAL = "flywheel.params.total"
TAG_LORA = "flywheel.lora"
TAG_ADAPTER = "flywheel.adapter"  # the adapter's artifact URI (LoRA runs)
TAG_DATA_FORMAT = "flywheel.data_format"


def _tensor_count(files: list[Path]) -> int:
    """Parameters in safetensors files, from their headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(st.get_slice(key).get_shape())
    return total


def training_tags(model_dir: Path) -> dict[str, str]:
    """Method, base model, trainable and total parameters and (LoRA) the adapter config of
    a trained model directory: its training record (`artifacts.TRAINING_INFO`), its
    weights' headers and, for LoRA, PEFT's own ``adapter/adapter_config.json``.

    Counted as training saw them: a LoRA run trains the adapter's parameters on top of the
    base's (total = merged weights + adapter, as `flywheel.sft.lora.count_parameters`).
    """
    from flywheel.artifacts import TRAINING_INFO

    info_file = model_dir / TRAINING_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    train = info.get("train") or {}
    model = info.get("model") or {}
    source = (info.get("summary") or {}).get("model_source") or {}
    method = str(train.get("method") or "full")
    adapter = model_dir / ADAPTER_DIR
    lora = adapter / "adapter_config.json"
    # As the profile named it (models:/flywheel-lm@champion, not the cache directory it
    # resolved to); a warm start's init_from directory; nothing for a fresh model.
    kind = source.get("kind")
    base = source.get("path") if kind == "init_from" else None
    base = base or (None if kind == "fresh" else model.get("base") or source.get("path"))
    if not base and lora.is_file():
        base = json.loads(lora.read_text()).get("base_model_name_or_path")
    merged = _tensor_count(sorted(model_dir.glob("*.safetensors")))
    trainable = merged
    out = {TAG_METHOD: method, TAG_BASE_MODEL: str(base or "fresh")}
    if method != "full" and lora.is_file():
        trainable = _tensor_count(sorted(adapter.glob("*.safetensors")))
        peft = json.loads(lora.read_text())
        targets = peft.get("target_modules") or []
        out[TAG_LORA] = json.dumps(
            {
                "r": peft.get("r"),
                "lora_alpha": peft.get("lora_alpha"),
                "lora_dropout": peft.get("lora_dropout"),
                "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            },
            sort_keys=True,
        )
    total = merged + (trainable if method != "full" else 0)
    if merged:
        out[TAG_PARAMS_TRAINABLE] = str(trainable)
        out[TAG_PARAMS_TOTAL] = str(total)
    return out
