"""Performance drift's numbers (pure): bits per byte of each side, the relative difference
and its independent-samples bootstrap interval."""

import math

import numpy as np
import pytest

from flywheel.degradation import relative_degradation

LN2 = math.log(2)


def _docs(rng, n, bpb, spread=0.2):
    """Per-document (bits, bytes) around a bits-per-byte level, bytes of varying length."""
    n_bytes = rng.integers(200, 2000, size=n).astype(float)
    bits = n_bytes * rng.normal(bpb, spread, size=n).clip(0.1)
    return bits, n_bytes


def test_point_estimates_are_byte_weighted():
    d = relative_degradation(
        np.array([100.0, 300.0]),
        np.array([100.0, 100.0]),
        np.array([150.0, 50.0]),
        np.array([100.0, 100.0]),
        samples=200,
        confidence=0.9,
        seed=0,
    )
    assert d.window_bpb == pytest.approx(2.0) and d.reference_bpb == pytest.approx(1.0)
    assert d.rel == pytest.approx(1.0)
    assert (d.n_window, d.n_reference, d.confidence) == (2, 2, 0.9)


def test_same_level_interval_holds_zero_and_is_not_degraded():
    rng = np.random.default_rng(1)
    d = relative_degradation(*_docs(rng, 200, 2.0), *_docs(rng, 200, 2.0), 1000, 0.95, 0)
    assert d.low < 0 < d.high
    assert abs(d.rel) < 0.05
    assert not d.degraded(0.0) and not d.degraded(0.05)


def test_a_worse_window_is_degraded_beyond_the_margin_only():
    rng = np.random.default_rng(2)
    d = relative_degradation(*_docs(rng, 200, 2.6), *_docs(rng, 200, 2.0), 1000, 0.95, 0)
    assert 0.2 < d.low < d.rel < d.high < 0.4
    assert d.degraded(0.05) and d.degraded(0.2)
    assert not d.degraded(d.low + 0.01)


def test_deterministic_for_a_seed_and_empty_documents_are_dropped():
    rng = np.random.default_rng(3)
    w, r = _docs(rng, 50, 2.2), _docs(rng, 50, 2.0)
    a = relative_degradation(*w, *r, 500, 0.95, seed=7)
    assert a == relative_degradation(*w, *r, 500, 0.95, seed=7)
    assert a != relative_degradation(*w, *r, 500, 0.95, seed=8)
    padded = relative_degradation(np.append(w[0], 0.0), np.append(w[1], 0.0), *r, 500, 0.95, seed=7)
    assert padded.n_window == 50 and padded.window_bpb == pytest.approx(a.window_bpb)


def test_too_few_documents_give_no_interval_and_never_count_as_degraded():
    d = relative_degradation(
        np.array([900.0]), np.array([100.0]), np.array([100.0]), np.array([100.0]), 500, 0.95, 0
    )
    assert d.rel == pytest.approx(8.0)
    assert math.isnan(d.low) and not d.degraded(0.0)
