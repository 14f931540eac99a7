"""Evaluation on the full tiny held-out split (170 documents): a model trained a few dozen
steps beats a random init by far, the intervals say so, and the gate promotes it."""

from __future__ import annotations

import math
import time

import pytest
from fixtures_models import VOCAB, build_eval_dataset, build_models

from flywheel.config import GatePolicy, Profile
from flywheel.evaluate import evaluate
from flywheel.gate import decide_promotion

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    random_dir, trained_dir = build_models(root / "models", steps=60)
    return random_dir, trained_dir, build_eval_dataset(root / "ds", max_docs=200)


def test_trained_beats_random_and_the_gate_agrees(setup):
    random_dir, trained_dir, ds = setup
    profile = Profile(eval={"max_docs": 200, "bootstrap_samples": 200, "prompts": ["The if"]})
    t0 = time.perf_counter()
    rnd = evaluate(profile, random_dir, ds)
    trn = evaluate(profile, trained_dir, ds)
    elapsed = time.perf_counter() - t0
    assert rnd.n_docs == trn.n_docs == 170 and rnd.n_tokens == trn.n_tokens > 15_000
    # Random init: ~uniform over the vocabulary (pinned from tiny runs: ~513 for 512 tokens).
    assert 0.8 * VOCAB < rnd.perplexity < 1.25 * VOCAB
    # 60 AdamW steps: ~200 (unigram-level); pinned with room for CPU nondeterminism.
    assert trn.perplexity < 0.6 * rnd.perplexity
    assert trn.accuracy > 3 * rnd.accuracy
    for rep in (rnd, trn):
        assert math.isfinite(rep.perplexity)
        assert rep.perplexity_ci[0] <= rep.perplexity <= rep.perplexity_ci[1]
        assert rep.accuracy_ci[0] <= rep.accuracy <= rep.accuracy_ci[1]
    # Far apart: the intervals do not overlap.
    assert trn.perplexity_ci[1] < rnd.perplexity_ci[0]
    # Both models, 170 documents, 200 bootstrap resamples and a prompt: seconds, not minutes.
    assert elapsed < 60, elapsed

    win = decide_promotion(trn, rnd, GatePolicy())
    lose = decide_promotion(rnd, trn, GatePolicy())
    assert win.promote and not lose.promote
    assert win.deltas["perplexity_rel"] < -0.4
    md = win.to_markdown(trn, rnd)
    assert "**PROMOTE**" in md and "The if" in md
