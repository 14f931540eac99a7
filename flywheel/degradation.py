"""Performance drift: is the champion worse on what production sends it now?

Distribution drift says the text changed; it cannot say whether the change matters. A
narrower slice of the champion's own source (longer paragraphs of the same docs) is
"different" to every distribution test, yet the champion models it as well as ever, and a
retrain on it cannot help. The question a retrain answers is whether the model in
production got worse, so the monitor also measures that directly:

- the champion's bits per byte (flywheel.evaluate: summed loss in bits over the UTF-8
  bytes scored; comparable across texts of different lengths and tokenisations) on a
  sample of the window, and
- the same on a held-out sample of its own training distribution (the test split sample
  logged with its training run, found through the `training_run_id` lineage tag),
- and the relative difference, window / reference - 1, with a percentile bootstrap
  interval. The two samples are different documents, so the bootstrap resamples each side
  independently (not the gate's paired bootstrap, which needs the same documents twice).

`relative_degradation` is pure and deterministic for a seed; `measure` scores the texts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flywheel.config import Profile

LN2 = math.log(2)
_CHUNK = 1000  # resamples per gather (bounds memory)
# A bootstrap of one document resamples that document: an interval of width zero, no
# evidence. Fewer on either side and the comparison cannot decide.
MIN_DOCS = 2


@dataclass(frozen=True)
class PerformanceDrift:
    """The champion's bits per byte on the window and on its own held-out sample."""

    window_bpb: float
    reference_bpb: float
    rel: float  # window / reference - 1: +0.10 is 10% more bits per byte on the window
    low: float  # interval of rel at `confidence`, two-sided
    high: float
    n_window: int
    n_reference: int
    confidence: float
    reference: str = "held-out"  # "held-out" or "training sample" (older champions)

    @property
    def decided(self) -> bool:
        """Whether the numbers can say anything: too few documents with scored bytes (the
        bootstrap needs MIN_DOCS on each side) give a NaN interval, and a NaN is neither
        "worse" nor "not worse"."""
        return all(math.isfinite(x) for x in (self.rel, self.low, self.high))

    def degraded(self, min_degradation: float) -> bool:
        """Significantly worse by more than `min_degradation`: the whole interval above it.
        False when not `decided`: ask `decided` first."""
        return self.decided and self.low > min_degradation

    def describe(self) -> str:
        """One line naming the numbers, for the decision's reason."""
        pct = round(100 * self.confidence)
        if not self.decided:
            return (
                f"champion's bits per byte cannot be compared: {self.n_window} window and "
                f"{self.n_reference} {self.reference} documents with scored text (at least "
                f"{MIN_DOCS} each)"
            )
        return (
            f"champion {self.window_bpb:.3f} bits/byte on the window vs {self.reference_bpb:.3f} "
            f"on its {self.reference} sample ({self.rel:+.1%}, {pct}% interval "
            f"{self.low:+.1%}..{self.high:+.1%})"
        )

    def metrics(self) -> dict[str, float]:
        return {
            "window_bits_per_byte": self.window_bpb,
            "reference_bits_per_byte": self.reference_bpb,
            "degradation": self.rel,
            "degradation_low": self.low,
            "degradation_high": self.high,
            "perf_n_window": float(self.n_window),
            "perf_n_reference": float(self.n_reference),
        }

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def relative_degradation(
    bits_w: np.ndarray,
    bytes_w: np.ndarray,
    bits_r: np.ndarray,
    bytes_r: np.ndarray,
    samples: int,
    confidence: float,
    seed: int,
    reference: str = "held-out",
) -> PerformanceDrift:
    """Byte-weighted bits per byte of each side and window/reference - 1, with an
    independent-samples percentile bootstrap interval (pure)."""
    bw, nw, br, nr = (np.asarray(x, dtype=float) for x in (bits_w, bytes_w, bits_r, bytes_r))
    keep_w, keep_r = nw > 0, nr > 0  # a document with no scored bytes carries no evidence
    bw, nw, br, nr = bw[keep_w], nw[keep_w], br[keep_r], nr[keep_r]
    w = float(bw.sum() / nw.sum()) if nw.sum() > 0 else math.nan
    r = float(br.sum() / nr.sum()) if nr.sum() > 0 else math.nan
    rel = w / r - 1 if r > 0 else math.nan
    lo = hi = math.nan
    if len(bw) >= MIN_DOCS and len(br) >= MIN_DOCS and samples > 0 and math.isfinite(rel):
        rng = np.random.default_rng(seed)
        rels = []
        for start in range(0, samples, _CHUNK):
            k = min(_CHUNK, samples - start)
            iw = rng.integers(0, len(bw), size=(k, len(bw)))
            ir = rng.integers(0, len(br), size=(k, len(br)))
            ratio_w = bw[iw].sum(axis=1) / nw[iw].sum(axis=1)
            ratio_r = br[ir].sum(axis=1) / nr[ir].sum(axis=1)
            rels.append(ratio_w / ratio_r - 1)
        alpha = (1.0 - confidence) / 2.0
        lo, hi = (float(q) for q in np.quantile(np.concatenate(rels), [alpha, 1.0 - alpha]))
    return PerformanceDrift(w, r, rel, lo, hi, len(bw), len(br), confidence, reference)


def _sample(texts: list[str], n: int, seed: int) -> list[str]:
    if len(texts) <= n:
        return texts
    idx = np.random.default_rng(seed).choice(len(texts), size=n, replace=False)
    return [texts[i] for i in sorted(idx)]


def measure(
    profile: Profile,
    model_dir: Path,
    window_texts: list[str],
    reference_texts: list[str],
    reference: str = "held-out",
) -> PerformanceDrift:
    """Score up to `drift.performance_docs` documents of each side with the champion, the
    way the evaluation step does (`eval.batch_size`, `eval.max_tokens_per_doc`)."""
    import torch

    from flywheel.evaluate.core import load_model, score_documents

    cfg = profile.drift
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(Path(model_dir), device)
    torch.manual_seed(cfg.seed)
    sums = [
        score_documents(
            model, tokenizer, _sample(texts, cfg.performance_docs, cfg.seed), profile.eval, device
        )
        for texts in (window_texts, reference_texts)
    ]
    win, ref = (s.nll / LN2 for s in sums)
    return relative_degradation(
        win,
        sums[0].bytes,
        ref,
        sums[1].bytes,
        cfg.bootstrap_samples,
        cfg.confidence,
        cfg.seed,
        reference,
    )
