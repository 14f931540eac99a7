"""Pure numbers: corpus metrics from per-document sums, bootstrap intervals, repetition.

Per-document sums (not per-token values) are what the bootstrap resamples: documents are
the independent units of a held-out split, tokens within one document are not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DocSums:
    """Per-document totals: summed NLL (nats), correct top-1 predictions, predicted tokens."""

    nll: np.ndarray
    correct: np.ndarray
    tokens: np.ndarray

    @classmethod
    def empty(cls, n_docs: int) -> DocSums:
        return cls(np.zeros(n_docs), np.zeros(n_docs), np.zeros(n_docs))

    def kept(self) -> DocSums:
        """Documents with at least one predicted token (a one-token document predicts none)."""
        mask = self.tokens > 0
        return DocSums(self.nll[mask], self.correct[mask], self.tokens[mask])


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


def bootstrap_ci(
    s: DocSums, samples: int, confidence: float, seed: int
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Percentile bootstrap over documents for (perplexity, accuracy); None if not computable.

    Each resample draws documents with replacement and recomputes the token-weighted
    ratio, so long documents weigh as much as they do in the point estimate. Vectorised:
    200 resamples of 200 documents is one 200x200 gather.
    """
    n = len(s.tokens)
    if samples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    tok = s.tokens[idx].sum(axis=1)
    mean_nll = s.nll[idx].sum(axis=1) / tok
    acc = s.correct[idx].sum(axis=1) / tok
    alpha = (1.0 - confidence) / 2.0
    q = [alpha, 1.0 - alpha]
    with np.errstate(over="ignore"):
        ppl_lo, ppl_hi = np.exp(np.quantile(mean_nll, q))
    acc_lo, acc_hi = np.quantile(acc, q)
    return (float(ppl_lo), float(ppl_hi)), (float(acc_lo), float(acc_hi))


def repetition(tokens: Sequence[int], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram: 0 for varied text, near 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
