"""Evaluate a causal LM on the held-out documents of a Dataset.

The documents (``text/test.parquet``), not the packed test blocks, are evaluated: each
model is scored with its OWN tokenizer, so a challenger with a new vocabulary and the
champion with the old one are compared on the same text. Perplexity is therefore per
token of each model's tokenizer; with different tokenizers the comparison is only
fair as far as the tokenizers cut text alike, which holds for the retraining loop (the
tokenizer is trained on the same corpus each time).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from flywheel import artifacts
from flywheel.config import EvalConfig, Profile
from flywheel.errors import DataError, FlywheelError
from flywheel.evaluate.metrics import DocSums, bootstrap_ci, point_metrics, repetition
from flywheel.evaluate.report import EvalReport, GenerationCheck

log = logging.getLogger(__name__)


def read_test_documents(dataset_dir: Path, max_docs: int | None) -> tuple[list[str], str | None]:
    """The held-out texts (file order, which the data stage makes deterministic) and the
    dataset's content hash."""
    import pandas as pd

    manifest = artifacts.read_manifest(dataset_dir)
    path = Path(dataset_dir) / artifacts.TEST_TEXT
    if not path.is_file():
        raise DataError(f"{path}: held-out documents not found (the data stage writes them)")
    try:
        frame = pd.read_parquet(path, columns=["text"])
    except Exception as exc:  # pyarrow raises several types for a missing column or bad file
        raise DataError(f"{path}: cannot read column 'text' ({exc})") from None
    texts = [t for t in frame["text"].tolist() if isinstance(t, str) and t.strip()]
    if max_docs:
        texts = texts[:max_docs]
    if not texts:
        raise DataError(f"{path}: no non-empty held-out documents to evaluate")
    return texts, manifest.get("content_hash")


def resolve_model(profile: Profile, model: str | Path) -> Path:
    """A local model directory for a path or a registry URI (models:/name@alias, models:/name/3)."""
    if isinstance(model, str) and model.startswith("models:/"):
        from flywheel.registry import resolve_model_uri

        return resolve_model_uri(profile, model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FlywheelError(f"{path}: not a model directory (no config.json from save_pretrained)")
    return path


def _context_length(model: Any) -> int:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 1024


def _chunks(
    ids: list[list[int]], prefix: list[int], context: int, max_tokens: int | None
) -> list[tuple[int, list[int]]]:
    """(document index, window of <= context+1 tokens) covering each document once.

    Non-overlapping windows: every token is predicted exactly once, with the context
    reset at window boundaries. A sliding window (stride < context) gives a slightly lower
    perplexity at context/stride times the cost; both models are scored the same way, so
    the gate's comparison does not need it.
    """
    out: list[tuple[int, list[int]]] = []
    for d, doc in enumerate(ids):
        seq = prefix + (doc[:max_tokens] if max_tokens else doc)
        for start in range(0, len(seq) - 1, context):
            out.append((d, seq[start : start + context + 1]))
    return out


def score_documents(
    model: Any, tokenizer: Any, texts: list[str], cfg: EvalConfig, device: str
) -> DocSums:
    """Summed NLL, correct top-1 predictions and predicted tokens per document."""
    import torch
    import torch.nn.functional as F

    # verbose=False: documents longer than the context are expected; they are windowed below.
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    # Prefix the beginning-of-text token so a document's first token is predicted too (GPT-2
    # style models use eos for that); without one, the first token has no context to score.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [start] if start is not None else []
    context = _context_length(model)
    chunks = _chunks(ids, prefix, context, cfg.max_tokens_per_doc)
    # Longest first, so each batch pads to nearly its own length.
    chunks.sort(key=lambda c: -len(c[1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = DocSums.empty(len(texts))
    with torch.inference_mode():
        for b in range(0, len(chunks), cfg.batch_size):
            batch = chunks[b : b + cfg.batch_size]
            width = max(len(c) for _, c in batch) - 1
            inputs = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, seq) in enumerate(batch):
                n = len(seq) - 1
                inputs[row, :n] = torch.tensor(seq[:-1])
                labels[row, :n] = torch.tensor(seq[1:])
                mask[row, :n] = 1
            inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=inputs, attention_mask=mask).logits.float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(len(batch), width)
            valid = labels != -100
            correct = (logits.argmax(-1) == labels) & valid
            docs = np.array([d for d, _ in batch])
            np.add.at(sums.nll, docs, nll.sum(1).double().cpu().numpy())
            np.add.at(sums.correct, docs, correct.sum(1).cpu().numpy())
            np.add.at(sums.tokens, docs, valid.sum(1).cpu().numpy())
    return sums


def generation_checks(
    model: Any, tokenizer: Any, cfg: EvalConfig, device: str
) -> list[GenerationCheck]:
    """Greedy continuations of the profile's prompts: non-empty, not looping, and how fast."""
    import torch

    context = _context_length(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checks = []
    for prompt in cfg.prompts:
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"][
            -(context - 1) :
        ] or [tokenizer.eos_token_id or 0]
        budget = max(1, min(cfg.max_new_tokens, context - len(ids)))
        inputs = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad,
            )
        elapsed = time.perf_counter() - t0
        new = out[0, len(ids) :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True)
        rep = repetition(new)
        checks.append(
            GenerationCheck(
                prompt=prompt,
                output=text,
                new_tokens=len(new),
                seconds_per_token=elapsed / max(1, len(new)),
                repetition=rep,
                non_empty=bool(text.strip()),
                degenerate=rep > cfg.max_repetition,
            )
        )
    return checks


def _load(model_dir: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.float32
        if device == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16  # logits are upcast before the loss (see score_documents)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise FlywheelError(f"{model_dir}: cannot load model or tokenizer ({exc})") from None
    return model.to(device).eval(), tokenizer


def evaluate(profile: Profile, model: str | Path, dataset_dir: Path) -> EvalReport:
    """Score `model` (a directory or a models:/ URI) on the held-out documents of `dataset_dir`."""
    import torch

    t0 = time.perf_counter()
    cfg = profile.eval
    dataset_dir = Path(dataset_dir)
    texts, data_hash = read_test_documents(dataset_dir, cfg.max_docs)
    model_dir = resolve_model(profile, model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tokenizer = _load(model_dir, device)
    torch.manual_seed(cfg.seed)

    sums = score_documents(lm, tokenizer, texts, cfg, device).kept()
    ppl, acc, mean_nll = point_metrics(sums)
    ci = bootstrap_ci(sums, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    gen = generation_checks(lm, tokenizer, cfg, device) if cfg.prompts else []
    report = EvalReport(
        model=str(model),
        model_dir=str(model_dir),
        dataset=str(dataset_dir),
        data_hash=data_hash,
        perplexity=ppl,
        perplexity_ci=ci[0] if ci else None,
        accuracy=acc,
        accuracy_ci=ci[1] if ci else None,
        mean_nll=mean_nll,
        confidence=cfg.confidence,
        bootstrap_samples=cfg.bootstrap_samples,
        n_docs=len(sums.tokens),
        n_tokens=int(sums.tokens.sum()),
        seconds=time.perf_counter() - t0,
        generation=gen,
    )
    log.info(
        "evaluated %s: perplexity %.3f accuracy %.4f on %d docs / %d tokens in %.1fs",
        model,
        ppl,
        acc,
        report.n_docs,
        report.n_tokens,
        report.seconds,
    )
    if not math.isfinite(ppl):
        log.warning("%s: perplexity is not finite; the gate will reject this model", model)
    return report
