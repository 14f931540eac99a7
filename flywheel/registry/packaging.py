"""Model packaging: a save_pretrained directory in (the MLflow transformers flavour, so
``mlflow models serve -m models:/<name>@champion`` serves it), and one out again, through
a download cache under the state dir."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from flywheel import artifacts
from flywheel.errors import RegistryError
from flywheel.registry.adapter import MlflowAdapter, ModelVersionInfo
from flywheel.registry.lineage import CARD_ARTIFACT, MODEL_ARTIFACT

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def save_mlflow_model(model_dir: Path, out: Path, model_card: str) -> str:
    """Save with the transformers flavour; returns the flavour used ("transformers" | "raw").

    Loaded from an absolute path, so MLflow sees a local model and skips the Hub lookups
    (model card, license) it would otherwise make. Requirements are given, not inferred:
    inference loads the model in a subprocess (tens of seconds) for a list we know.
    """
    try:
        import mlflow.transformers
        import torch
        import transformers
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = model_dir.resolve()
        model = AutoModelForCausalLM.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
        context = int(
            getattr(model.config, "n_positions", None)
            or getattr(model.config, "max_position_embeddings", None)
            or 1024
        )
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(out),
            task="text-generation",
            model_card=ModelCard(model_card),
            # Serving defaults: a tiny context must not be overrun by the pipeline's 256.
            model_config={"max_new_tokens": max(1, min(64, context // 2))},
            pip_requirements=[
                f"transformers=={transformers.__version__}",
                f"torch=={torch.__version__.split('+')[0]}",
            ],
        )
    except Exception as exc:
        # Fallback: a model the flavour cannot wrap (an architecture without a
        # text-generation pipeline, a flavour bug in a new transformers) is still registered
        # as its raw save_pretrained files: from_pretrained, evaluation and warm starts work;
        # only `mlflow models serve` does not. The version's flywheel.flavor tag says which.
        log.warning(
            "transformers flavour could not save %s (%s); logging raw files", model_dir, exc
        )
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(model_dir, out)
        (out / CARD_ARTIFACT).write_text(model_card)
        return "raw"
    # Files the flavour does not know (training summary) travel next to the weights.
    for name in (artifacts.TRAINING_INFO,):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / "model" / name)
    return "transformers"


def flatten(fetched: Path, out: Path) -> None:
    """An MLflow transformers model (MLmodel, model/, components/tokenizer/) becomes one
    save_pretrained directory; anything else (the raw fallback) is copied as is."""
    if (fetched / "MLmodel").is_file() and (fetched / "model").is_dir():
        shutil.copytree(fetched / "model", out)
        tokenizer = fetched / "components" / "tokenizer"
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, out, dirs_exist_ok=True)
        if (fetched / CARD_ARTIFACT).is_file():
            shutil.copy2(fetched / CARD_ARTIFACT, out / CARD_ARTIFACT)
    else:
        shutil.copytree(fetched, out)


def download(store: MlflowAdapter, info: ModelVersionInfo, cache: Path) -> Path:
    """A local save_pretrained directory (model + tokenizer) of one version, cached under
    `cache` by version number (a version's files never change). Concurrent downloads
    each stage privately; the first to finish wins the rename."""
    dest = cache / f"v{info.version}"
    if (dest / COMPLETE).is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{info.version}-", dir=cache))
    try:
        fetched = staging / "fetched"
        fetched.mkdir()
        what = f"download version {info.version}"
        if info.run_id and info.source.rstrip("/").endswith(f"/{MODEL_ARTIFACT}"):
            store.call(
                what, store.client.download_artifacts, info.run_id, MODEL_ARTIFACT, str(fetched)
            )
            fetched = fetched / MODEL_ARTIFACT
        else:
            import mlflow.artifacts as mlflow_artifacts

            fetched = Path(
                store.call(
                    what,
                    mlflow_artifacts.download_artifacts,
                    artifact_uri=info.source,
                    dst_path=str(fetched),
                    tracking_uri=store.uri,
                )
            )
        out = staging / "model"
        flatten(fetched, out)
        if not (out / "config.json").is_file():
            raise RegistryError(
                f"{info.name} version {info.version} ({info.source}) holds no Hugging Face "
                "model (no config.json)"
            )
        (out / COMPLETE).write_text(info.version)
        try:
            os.replace(out, dest)
        except OSError:
            if not (dest / COMPLETE).is_file():  # a concurrent download won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
