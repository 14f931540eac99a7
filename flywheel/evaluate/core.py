"""Evaluate a causal LM on the held-out documents of a Dataset.

The documents (``text/test.parquet``), not the packed test blocks, are evaluated: each
model is scored with its OWN tokenizer, so a challenger with a new vocabulary and the
champion with the old one are scored on the same text. The primary metric is bits per
byte (summed loss in bits over the UTF-8 bytes scored), which does not depend on the
tokenizer; perplexity and next-token accuracy are per token of each model's vocabulary
and are shown beside it. Per-document scores, keyed by document id, go into the report
so the gate can compare two models document by document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from flywheel import artifacts
from flywheel.config import EvalConfig, Profile
from flywheel.errors import DataError, FlywheelError
from flywheel.evaluate import sft as S
from flywheel.evaluate.metrics import (
    DocSums,
    bits_per_byte,
    bootstrap_ci,
    point_metrics,
    repetition,
)
from flywheel.evaluate.report import DocScores, EvalReport, GenerationCheck
from flywheel.sft import metrics as M

log = logging.getLogger(__name__)


def read_test_split(
    dataset_dir: Path, max_docs: int | None
) -> tuple[list[str], list[str], str | None]:
    """(ids, texts, content hash) of the held-out documents, in file order (which the data
    stage makes deterministic).

    Ids come from the split's `id` column; without one, or where an id repeats, the row's
    position stands in, which is stable because both models read the same file (the gate
    checks the content hash).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    manifest = artifacts.DatasetManifest.read(dataset_dir)
    path = Path(dataset_dir) / artifacts.TEST_TEXT
    if not path.is_file():
        raise DataError(f"{path}: held-out documents not found (the data stage writes them)")
    try:
        has_id = "id" in pq.read_schema(path).names
        frame = pd.read_parquet(path, columns=["id", "text"] if has_id else ["text"])
    except Exception as exc:  # pyarrow raises several types for a missing column or bad file
        raise DataError(f"{path}: cannot read column 'text' ({exc})") from None
    raw_ids = frame["id"].tolist() if has_id else [None] * len(frame)
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for row, (doc_id, text) in enumerate(zip(raw_ids, frame["text"].tolist(), strict=True)):
        if not (isinstance(text, str) and text.strip()):
            continue
        key = str(doc_id) if doc_id is not None and str(doc_id) not in seen else f"#{row}"
        seen.add(key)
        ids.append(key)
        texts.append(text)
        if max_docs and len(texts) >= max_docs:
            break
    if not texts:
        raise DataError(f"{path}: no non-empty held-out documents to evaluate")
    return ids, texts, manifest.content_hash


def read_test_documents(dataset_dir: Path, max_docs: int | None) -> tuple[list[str], str | None]:
    """The held-out texts and the dataset's content hash (see `read_test_split`)."""
    _, texts, data_hash = read_test_split(dataset_dir, max_docs)
    return texts, data_hash


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary (token -> id): equal fingerprints cut text into the
    same ids, so per-token metrics (accuracy) of two models are comparable."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


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


def scored_bytes(
    tokenizer: Any,
    texts: list[str],
    ids: list[list[int]],
    offsets: list[list[tuple[int, int]]] | None,
    has_prefix: bool,
    max_tokens: int | None,
) -> np.ndarray:
    """UTF-8 bytes of the text each document's PREDICTED tokens spell.

    A whole document scores all its bytes. One cut by `max_tokens` scores only its first
    tokens, and is charged only for the bytes those tokens cover: the text up to the end
    offset of the last one kept (fast tokenizers; a token that ends inside a multi-byte
    character counts that whole character, at most 3 bytes over). A slow tokenizer has no
    offsets; the kept ids are decoded instead. Without a beginning-of-text prefix the
    first token is context, not a prediction, and its bytes are not counted either.
    """
    out = np.zeros(len(texts))
    for d, (text, doc) in enumerate(zip(texts, ids, strict=True)):
        n = min(len(doc), max_tokens) if max_tokens else len(doc)
        first = 0 if has_prefix else 1
        if n <= first:
            continue
        if offsets is not None:
            begin = offsets[d][first - 1][1] if first else 0
            end = len(text) if n == len(doc) else offsets[d][n - 1][1]
            out[d] = len(text[begin:end].encode("utf-8"))
        elif n == len(doc) and first == 0:
            out[d] = len(text.encode("utf-8"))
        else:
            out[d] = len(tokenizer.decode(doc[first:n]).encode("utf-8"))
    return out


def score_documents(
    model: Any, tokenizer: Any, texts: list[str], cfg: EvalConfig, device: str
) -> DocSums:
    """Summed NLL, correct top-1 predictions, predicted tokens and the bytes they cover,
    per document."""
    import torch
    import torch.nn.functional as F

    # verbose=False: documents longer than the context are expected; they are windowed below.
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=fast)
    ids = enc["input_ids"]
    # Prefix the beginning-of-text token so a document's first token is predicted too (GPT-2
    # style models use eos for that); without one, the first token has no context to score.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [start] if start is not None else []
    context = _context_length(model)
    chunks = _chunks(ids, prefix, context, cfg.max_tokens_per_doc)
    n_bytes = scored_bytes(
        tokenizer,
        texts,
        ids,
        enc["offset_mapping"] if fast else None,
        bool(prefix),
        cfg.max_tokens_per_doc,
    )
    # Longest first, so each batch pads to nearly its own length.
    chunks.sort(key=lambda c: -len(c[1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = DocSums(np.zeros(len(texts)), np.zeros(len(texts)), np.zeros(len(texts)), n_bytes)
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
    context = _context_length(model)
    checks = []
    for prompt in cfg.prompts:
        t0 = time.perf_counter()
        # No stop at the tokenizer's EOS: the model's generation config decides, as served.
        new = M.greedy(
            model,
            tokenizer,
            prompt,
            cfg.max_new_tokens,
            context=context,
            device=device,
            stop_at_eos=False,
        )
        elapsed = time.perf_counter() - t0
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


# Public name: the monitor's performance check (flywheel.degradation) scores with it too.
load_model = _load


def evaluate(profile: Profile, model: str | Path, dataset_dir: Path) -> EvalReport:
    """Score `model` (a directory or a models:/ URI) on the held-out split of `dataset_dir`:
    its documents (raw text) or its samples (instruction/chat, `flywheel.evaluate.sft`)."""
    import torch

    t0 = time.perf_counter()
    cfg = profile.eval
    dataset_dir = Path(dataset_dir)
    manifest = artifacts.DatasetManifest.read(dataset_dir)
    sft_rows = None
    if manifest.format == "text":
        doc_ids, texts, data_hash = read_test_split(dataset_dir, cfg.max_docs)
    else:
        sft_rows = S.read_sft_test(dataset_dir, cfg.max_docs)
        data_hash = manifest.content_hash
    model_dir = resolve_model(profile, model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tokenizer = _load(model_dir, device)
    torch.manual_seed(cfg.seed)

    sft: dict[str, Any] = {}
    if sft_rows is not None:
        reference_tok = S.dataset_tokenizer(dataset_dir, tokenizer)
        items = S.decode_samples(sft_rows, reference_tok)
        if not items:
            raise DataError(f"{dataset_dir}: no held-out sample has a prompt and a response")
        doc_ids = [item.id for item in items]
        context = _context_length(lm)
        all_sums = S.score_samples(lm, tokenizer, items, cfg, device, context)
        examples = S.generate_examples(lm, tokenizer, items, cfg, device, context, reference_tok)
        sft = {
            "format": manifest.format,
            "exact_match": sum(e.exact for e in examples) / len(examples),
            "rouge_l": sum(e.rouge_l for e in examples) / len(examples),
            "examples": examples,
        }
    else:
        all_sums = score_documents(lm, tokenizer, texts, cfg, device)
    kept = all_sums.kept_mask()
    sums = all_sums.kept()
    ppl, acc, mean_nll = point_metrics(sums)
    if sft:
        sft["response_loss"] = mean_nll
    bpb = bits_per_byte(sums)
    ci = bootstrap_ci(sums, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    gen = generation_checks(lm, tokenizer, cfg, device) if cfg.prompts else []
    docs = DocScores(
        ids=[i for i, k in zip(doc_ids, kept, strict=True) if k],
        bits=sums.bits.tolist(),
        bytes=sums.bytes.astype(int).tolist(),
        tokens=sums.tokens.astype(int).tolist(),
        correct=sums.correct.astype(int).tolist(),
    )
    report = EvalReport(
        model=str(model),
        model_dir=str(model_dir),
        dataset=str(dataset_dir),
        data_hash=data_hash,
        bits_per_byte=bpb,
        bits_per_byte_ci=ci.get("bits_per_byte"),
        perplexity=ppl,
        perplexity_ci=ci.get("perplexity"),
        accuracy=acc,
        accuracy_ci=ci.get("accuracy"),
        mean_nll=mean_nll,
        confidence=cfg.confidence,
        bootstrap_samples=cfg.bootstrap_samples,
        n_docs=len(sums.tokens),
        n_tokens=int(sums.tokens.sum()),
        n_bytes=int(sums.bytes.sum()),
        tokenizer=tokenizer_fingerprint(tokenizer),
        seconds=time.perf_counter() - t0,
        generation=gen,
        docs=docs,
        **sft,
    )
    log.info(
        "evaluated %s: %.4f bits/byte, perplexity %.3f, accuracy %.4f on %d docs / %d tokens "
        "/ %d bytes in %.1fs",
        model,
        bpb,
        ppl,
        acc,
        report.n_docs,
        report.n_tokens,
        report.n_bytes,
        report.seconds,
    )
    if not (math.isfinite(bpb) and math.isfinite(ppl)):
        log.warning("%s: a metric is not finite; the gate will reject this model", model)
    return report
