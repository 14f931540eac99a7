"""Paired comparison of two models scored on the same held-out documents. Pure numbers.

Both models are scored document by document on the same text, so the question "is the
challenger better?" is asked of the per-document differences, not of two independent
intervals: most of the spread between documents (a hard document is hard for both
models) cancels in the difference, and the paired interval is several times narrower
than either model's own.

- `paired_bootstrap`: the byte-weighted bits-per-byte difference (challenger - champion)
  with a percentile interval from resampling documents (the same documents for both
  models in each resample). Byte-weighted, like the headline metric: with equal bytes
  per document it is the byte-weighted mean of the per-document differences.
- `mcnemar_exact`: McNemar's exact test, the two-sided binomial test on the discordant
  pairs. For next-token accuracy the pairs are documents (see `accuracy_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Resamples per gather: bounds memory at ~8 MB per 1,000 documents however many are asked.
_CHUNK = 1000


@dataclass(frozen=True)
class PairedDifference:
    """Bits per byte of both models on the paired documents, their difference and interval."""

    challenger: float
    champion: float
    diff: float  # challenger - champion (negative: the challenger is better)
    low: float
    high: float
    n_docs: int
    samples: int
    confidence: float

    @property
    def rel(self) -> float:
        """The difference as a share of the champion's bits per byte."""
        return self.diff / self.champion if self.champion else math.nan


def _ratio(bits: np.ndarray, n_bytes: np.ndarray) -> float:
    total = float(n_bytes.sum())
    return float(bits.sum()) / total if total > 0 else math.nan


def paired_bootstrap(
    bits_a: np.ndarray,
    bytes_a: np.ndarray,
    bits_b: np.ndarray,
    bytes_b: np.ndarray,
    samples: int,
    confidence: float,
    seed: int,
) -> PairedDifference:
    """Bits per byte of A minus B over the same documents (aligned arrays), with a paired
    percentile bootstrap interval at `confidence` (two-sided).

    Bytes are per model: a document truncated by `eval.max_tokens_per_doc` may cover a
    slightly different prefix under each tokenizer, and each model is charged for exactly
    the bytes it scored. Deterministic for a given seed (the gate stays a pure function).
    """
    arrays = [np.asarray(x, dtype=float) for x in (bits_a, bytes_a, bits_b, bytes_b)]
    n = len(arrays[0])
    if any(len(x) != n for x in arrays):
        raise ValueError("paired arrays must have one value per document, aligned")
    bits_a, bytes_a, bits_b, bytes_b = arrays
    a, b = _ratio(bits_a, bytes_a), _ratio(bits_b, bytes_b)
    diff = a - b
    lo = hi = math.nan
    if n >= 2 and samples > 0 and math.isfinite(diff):
        rng = np.random.default_rng(seed)
        diffs = []
        for start in range(0, samples, _CHUNK):
            idx = rng.integers(0, n, size=(min(_CHUNK, samples - start), n))
            with np.errstate(divide="ignore", invalid="ignore"):
                ra = bits_a[idx].sum(axis=1) / bytes_a[idx].sum(axis=1)
                rb = bits_b[idx].sum(axis=1) / bytes_b[idx].sum(axis=1)
            diffs.append(ra - rb)
        alpha = (1.0 - confidence) / 2.0
        lo, hi = (float(q) for q in np.quantile(np.concatenate(diffs), [alpha, 1.0 - alpha]))
    return PairedDifference(a, b, diff, lo, hi, n, samples, confidence)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test: of the b + c discordant pairs, b went one
    way and c the other; under no difference each is Binomial(b + c, 1/2).

    scipy's exact binomial test (scipy ships with evidently, a dependency) rather than
    the chi-squared approximation, which is poor for the few discordant pairs a small
    held-out split gives.
    """
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class AccuracyPairs:
    """Next-token accuracy compared document by document (same tokenizer on both sides)."""

    challenger_better: int  # documents where the challenger predicted more tokens right
    champion_better: int
    ties: int
    p_value: float  # McNemar's exact test on the discordant documents


def accuracy_pairs(correct_a: np.ndarray, correct_b: np.ndarray) -> AccuracyPairs:
    """McNemar's exact test with documents as the pairs: a document is discordant when one
    model predicted more of its next tokens correctly than the other.

    Why documents, not tokens: the classic token-level table treats tens of thousands of
    next-token predictions as independent pairs, but tokens of one document are not
    independent (the same reasoning as the bootstrap's), which makes the token-level p
    far too small. It also needs the two models' predictions to be of the same tokens,
    which documents give for any tokenizer pair but tokens only for identical tokenizers;
    and it would put a bit per token, not a number per document, in the report. The
    caller compares only models that share a tokenizer (per-token accuracy over
    different vocabularies measures different tasks), so `correct_*` count the same
    predictions on each document.
    """
    a = np.asarray(correct_a)
    b = np.asarray(correct_b)
    better, worse = int((a > b).sum()), int((a < b).sum())
    return AccuracyPairs(better, worse, int(len(a) - better - worse), mcnemar_exact(better, worse))
