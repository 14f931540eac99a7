"""Pure numbers: corpus metrics from per-document sums, bootstrap intervals, repetition.

Per-document sums (not per-token values) are what the bootstrap resamples: documents are
the independent units of a held-out split, tokens within one document are not.

Bits per byte is the primary language-model metric: the summed next-token loss of the
scored text, in bits, over its UTF-8 bytes. It does not depend on how a tokenizer cuts
the text (a coarser vocabulary predicts fewer, harder tokens; the bits for the same
bytes stay comparable), so models with different tokenizers can be compared on it.
Perplexity and next-token accuracy are per token of each model's own vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class DocSums:
    """Per-document totals: summed NLL (nats), correct top-1 predictions, predicted tokens,
    and the UTF-8 bytes of the text those tokens spell (the bytes actually scored)."""

    nll: np.ndarray
    correct: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray

    @classmethod
    def empty(cls, n_docs: int) -> DocSums:
        return cls(np.zeros(n_docs), np.zeros(n_docs), np.zeros(n_docs), np.zeros(n_docs))

    def kept_mask(self) -> np.ndarray:
        """Documents with at least one predicted token (a one-token document predicts none)."""
        return self.tokens > 0

    def kept(self) -> DocSums:
        mask = self.kept_mask()
        return DocSums(self.nll[mask], self.correct[mask], self.tokens[mask], self.bytes[mask])

    @property
    def bits(self) -> np.ndarray:
        """Summed loss per document in bits."""
        return self.nll / LN2


def _perplexity(nll: float, tokens: float) -> float:
    if tokens <= 0:
        return math.nan
    mean = nll / tokens
    # exp overflows above ~709 nats per token; inf is the honest answer and the gate rejects it.
    return math.exp(mean) if mean < 709 else math.inf


def point_metrics(s: DocSums) -> tuple[float, float, float]:
    """(perplexity, accuracy, mean NLL), token-weighted over the whole split."""
    tokens = float(s.tokens.sum())
    nll = float(s.nll.sum())
    mean = nll / tokens if tokens else math.nan
    acc = float(s.correct.sum()) / tokens if tokens else math.nan
    return _perplexity(nll, tokens), acc, mean


def bits_per_byte(s: DocSums) -> float:
    """Summed loss in bits over scored UTF-8 bytes, byte-weighted over the whole split."""
    n_bytes = float(s.bytes.sum())
    return float(s.nll.sum()) / LN2 / n_bytes if n_bytes > 0 else math.nan


Interval = tuple[float, float]


def bootstrap_ci(s: DocSums, samples: int, confidence: float, seed: int) -> dict[str, Interval]:
    """Percentile bootstrap over documents for perplexity, accuracy and bits per byte;
    empty when not computable (no resamples, fewer than two documents).

    Each resample draws documents with replacement and recomputes the token- (or byte-)
    weighted ratio, so long documents weigh as much as they do in the point estimate.
    Vectorised: 200 resamples of 200 documents is one 200x200 gather.
    """
    n = len(s.tokens)
    if samples <= 0 or n < 2:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    tok = s.tokens[idx].sum(axis=1)
    nll = s.nll[idx].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_nll = nll / tok
        acc = s.correct[idx].sum(axis=1) / tok
        bpb = nll / LN2 / s.bytes[idx].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    q = [alpha, 1.0 - alpha]
    with np.errstate(over="ignore"):
        ppl_lo, ppl_hi = np.exp(np.quantile(mean_nll, q))
    acc_lo, acc_hi = np.quantile(acc, q)
    bpb_lo, bpb_hi = np.quantile(bpb, q)
    return {
        "perplexity": (float(ppl_lo), float(ppl_hi)),
        "accuracy": (float(acc_lo), float(acc_hi)),
        "bits_per_byte": (float(bpb_lo), float(bpb_hi)),
    }


def repetition(tokens: Sequence[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram: 0 for varied text, near 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
