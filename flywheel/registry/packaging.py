"""Model packaging: a save_pretrained directory in (flywheel's pyfunc, `serving_model`, so
``mlflow models serve -m models:/<name>@champion`` serves it with generation params), and
one out again, through a download cache under the state dir."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.errors import RegistryError
from flywheel.registry.adapter import MlflowAdapter, ModelVersionInfo
from flywheel.registry.lineage import ADAPTER_ARTIFACT, CARD_ARTIFACT, MODEL_ARTIFACT

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _serving_params(model_dir: Path) -> dict[str, Any]:
    """The signature's params with their defaults; a tiny context must not be overrun."""
    from transformers import AutoConfig

    from flywheel.registry.serving_model import DEFAULT_PARAMS

    cfg = AutoConfig.from_pretrained(model_dir)
    context = int(
        getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
    )
    return {**DEFAULT_PARAMS, "max_new_tokens": max(1, min(64, context // 2))}


def _input_example(chat: bool) -> Any:
    """One row: a ``messages`` conversation (SFT) or a ``prompt`` string (text); a
    DataFrame, so the column's type is the row's (a dict of lists would read as arrays)."""
    import pandas as pd

    if chat:
        turn = {"role": "user", "content": "What does json.dumps do?"}
        return pd.DataFrame({"messages": [[turn]]})
    return pd.DataFrame({"prompt": ["The for statement"]})


def save_mlflow_model(
    model_dir: Path,
    out: Path,
    model_card: str,
    *,
    data_format: str = "text",
    chat_template: str | None = None,
) -> str:
    """Save as flywheel's pyfunc (`serving_model`); returns the flavour used ("pyfunc" | "raw").

    The signature declares the generation params (max_new_tokens, temperature, top_p, with
    defaults) that serving honours; an SFT model (`data_format` instruction or chat) takes
    chat turns (``messages``) and carries a chat-format input example, a text model a
    ``prompt``. `chat_template`: the template the model was trained with, stored in its
    tokenizer when the tokenizer has none, so serving renders turns the same way. The
    adapter directory of a LoRA run is not part of the served model (it is logged apart).
    Requirements are given, not inferred: inference loads the model in a subprocess (tens
    of seconds) for a list we know.
    """
    try:
        import mlflow
        import mlflow.pyfunc
        import torch
        import transformers
        from mlflow.models import infer_signature
        from transformers import AutoTokenizer

        from flywheel.registry import serving_model

        chat = data_format in ("instruction", "chat")
        with tempfile.TemporaryDirectory(prefix="flywheel-serving-") as tmp:
            hf = Path(tmp) / serving_model.HF_ARTIFACT
            shutil.copytree(model_dir, hf, ignore=shutil.ignore_patterns(ADAPTER_ARTIFACT))
            if chat:
                tokenizer = AutoTokenizer.from_pretrained(hf)
                if not getattr(tokenizer, "chat_template", None):
                    if not chat_template:
                        raise RegistryError("an SFT model's tokenizer has no chat template")
                    tokenizer.chat_template = chat_template
                    tokenizer.save_pretrained(hf)
            params = _serving_params(hf)
            example = _input_example(chat)
            signature = infer_signature(
                example, [{"text": "", "generated_tokens": 0}], params=params
            )
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=serving_model.__file__,  # logged from code: no pickle
                artifacts={serving_model.HF_ARTIFACT: str(hf)},
                signature=signature,
                input_example=(example, params) if chat else None,
                pip_requirements=[
                    f"mlflow=={mlflow.__version__}",
                    f"transformers=={transformers.__version__}",
                    f"torch=={torch.__version__.split('+')[0]}",
                ],
            )
    except Exception as exc:
        # Fallback: a model the pyfunc cannot wrap is still registered as its raw
        # save_pretrained files: from_pretrained, evaluation and warm starts work; only
        # `mlflow models serve` does not. The version's flywheel.flavor tag says which.
        log.warning("serving model could not save %s (%s); logging raw files", model_dir, exc)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns(ADAPTER_ARTIFACT))
        (out / CARD_ARTIFACT).write_text(model_card)
        return "raw"
    (out / CARD_ARTIFACT).write_text(model_card)
    return "pyfunc"


def flatten(fetched: Path, out: Path) -> None:
    """An MLflow transformers model (MLmodel, model/, components/tokenizer/) becomes one
    save_pretrained directory; anything else (the raw fallback) is copied as is."""
    served = fetched / "artifacts" / "hf"  # flywheel's pyfunc (serving_model.HF_ARTIFACT)
    if (fetched / "MLmodel").is_file() and (served / "config.json").is_file():
        shutil.copytree(served, out)
        if (fetched / CARD_ARTIFACT).is_file():
            shutil.copy2(fetched / CARD_ARTIFACT, out / CARD_ARTIFACT)
    elif (fetched / "MLmodel").is_file() and (fetched / "model").is_dir():
        # A version logged with MLflow's transformers flavour (before the pyfunc).
        shutil.copytree(fetched / "model", out)
        tokenizer = fetched / "components" / "tokenizer"
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, out, dirs_exist_ok=True)
        if (fetched / CARD_ARTIFACT).is_file():
            shutil.copy2(fetched / CARD_ARTIFACT, out / CARD_ARTIFACT)
    else:
        shutil.copytree(fetched, out)


def build_cached(dest: Path, stamp: str, build: Callable[[Path], Path]) -> Path:
    """`dest`, a cache entry built once. `build(staging)` fills a fresh directory beside
    `dest` and returns the directory to publish, which is marked COMPLETE (with `stamp`)
    and renamed into place; concurrent builders each stage privately and the first to
    finish wins the rename. An entry already COMPLETE is returned as it is."""
    if (dest / COMPLETE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        out = build(staging)
        (out / COMPLETE).write_text(stamp)
        try:
            os.replace(out, dest)
        except OSError:
            if not (dest / COMPLETE).is_file():  # a concurrent build won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def download(store: MlflowAdapter, info: ModelVersionInfo, cache: Path) -> Path:
    """A local save_pretrained directory (model + tokenizer) of one version, cached under
    `cache` by version number (a version's files never change). Concurrent downloads
    each stage privately; the first to finish wins the rename."""

    def fetch(staging: Path) -> Path:
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
        return out

    return build_cached(cache / f"v{info.version}", info.version, fetch)


def download_adapter(store: MlflowAdapter, info: ModelVersionInfo, uri: str, cache: Path) -> Path:
    """A version's LoRA adapter (PEFT save_pretrained directory), cached next to its model
    as ``v<N>-adapter``."""
    import mlflow.artifacts as mlflow_artifacts

    def fetch(staging: Path) -> Path:
        fetched = Path(
            store.call(
                f"download the adapter of version {info.version}",
                mlflow_artifacts.download_artifacts,
                artifact_uri=uri,
                dst_path=str(staging),
                tracking_uri=store.uri,
            )
        )
        if not (fetched / "adapter_config.json").is_file():
            raise RegistryError(f"{uri}: holds no PEFT adapter (no adapter_config.json)")
        return fetched

    return build_cached(cache / f"v{info.version}-adapter", info.version, fetch)
