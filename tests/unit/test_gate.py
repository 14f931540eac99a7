"""The promotion gate, case by case. Pure: reports are built in memory from synthetic
per-document scores (bits, bytes, tokens, correct predictions per document)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.config import GatePolicy
from flywheel.evaluate.paired import accuracy_pairs, mcnemar_exact, paired_bootstrap
from flywheel.evaluate.report import DocScores, EvalReport, GenerationCheck
from flywheel.gate import Decision, decide_promotion

NAN, INF = math.nan, math.inf
LN2 = math.log(2)
N_DOCS = 200


def docs(seed: int = 0, n: int = N_DOCS) -> dict[str, np.ndarray]:
    """A champion-like held-out split: documents of 200-2000 bytes, ~1.5 bits per byte with
    a spread between documents (some are harder), ~3.5 bytes per token."""
    rng = np.random.default_rng(seed)
    n_bytes = rng.integers(200, 2000, n)
    hardness = rng.normal(1.5, 0.3, n).clip(0.5)
    tokens = np.maximum(1, (n_bytes / 3.5).astype(int))
    return {
        "bits": hardness * n_bytes,
        "bytes": n_bytes,
        "tokens": tokens,
        "correct": (tokens * rng.uniform(0.25, 0.45, n)).astype(int),
    }


def report(
    d: dict[str, np.ndarray] | None = None,
    *,
    data: str = "abc123",
    tokenizer: str = "tok-a",
    ids: list[str] | None = None,
    per_doc: bool = True,
    **kw,
) -> EvalReport:
    """An EvalReport whose headline numbers are computed from the per-document columns."""
    d = docs() if d is None else d
    bits, n_bytes, tokens, correct = (
        np.asarray(d[k]) for k in ("bits", "bytes", "tokens", "correct")
    )
    mean_nll = bits.sum() * LN2 / tokens.sum()
    ids = ids or [f"doc-{i:04d}" for i in range(len(bits))]
    fields = {
        "model": "models:/m@x",
        "model_dir": "/tmp/m",
        "dataset": "/tmp/ds",
        "data_hash": data,
        "bits_per_byte": bits.sum() / n_bytes.sum(),
        "bits_per_byte_ci": None,
        "perplexity": math.exp(mean_nll),
        "accuracy": correct.sum() / tokens.sum(),
        "mean_nll": mean_nll,
        "confidence": 0.95,
        "bootstrap_samples": 200,
        "n_docs": len(bits),
        "n_tokens": int(tokens.sum()),
        "n_bytes": int(n_bytes.sum()),
        "tokenizer": tokenizer,
        "seconds": 1.0,
        "docs": DocScores(
            ids=ids,
            bits=bits.tolist(),
            bytes=n_bytes.astype(int).tolist(),
            tokens=tokens.astype(int).tolist(),
            correct=correct.astype(int).tolist(),
        )
        if per_doc
        else None,
    }
    fields.update(kw)
    return EvalReport(**fields)


def scaled(d: dict[str, np.ndarray], factor: float, noise: float = 0.0, seed: int = 1):
    """The same documents with every document's bits times `factor`, plus per-document
    noise of relative size `noise` (centred, so on its own it moves the total ~not at all)."""
    rng = np.random.default_rng(seed)
    jitter = rng.normal(0, noise, len(d["bits"]))
    jitter -= np.average(jitter, weights=d["bits"])
    return {**d, "bits": d["bits"] * factor * (1 + jitter)}


POLICY = GatePolicy()
NONINF = GatePolicy(mode="non_inferiority")
CHAMPION = report()


# ------------------------------------------------------------------ pure statistics


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 10 discordant pairs all one way: p = 2 * 0.5**10.
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    # 60 vs 40: p = 0.0569 (two-sided binomial), not significant at 5%.
    assert mcnemar_exact(60, 40) == pytest.approx(0.05689, abs=1e-4)


def test_accuracy_pairs_count_documents_not_tokens():
    pairs = accuracy_pairs(np.array([5, 3, 7, 7]), np.array([4, 3, 9, 2]))
    assert (pairs.challenger_better, pairs.champion_better, pairs.ties) == (2, 1, 1)


def test_paired_bootstrap_of_identical_models_is_exactly_zero():
    d = docs()
    res = paired_bootstrap(d["bits"], d["bytes"], d["bits"], d["bytes"], 500, 0.95, 0)
    assert res.diff == 0.0 and res.low == 0.0 and res.high == 0.0


def test_paired_interval_is_far_narrower_than_the_independent_ones():
    # A 1% improvement on every document: invisible next to the spread between documents
    # (two independent intervals overlap), plain in the paired difference.
    d = docs()
    better = scaled(d, 0.99, noise=0.02)
    res = paired_bootstrap(better["bits"], d["bytes"], d["bits"], d["bytes"], 2000, 0.95, 0)
    assert res.diff == pytest.approx(-0.01 * res.champion, rel=0.05)
    assert res.low < res.diff < res.high < 0
    from flywheel.evaluate.metrics import DocSums, bootstrap_ci

    def ci(x):
        sums = DocSums(x["bits"] * LN2, x["correct"], x["tokens"], x["bytes"].astype(float))
        return bootstrap_ci(sums, 2000, 0.95, 0)["bits_per_byte"]

    (a_lo, a_hi), (b_lo, b_hi) = ci(better), ci(d)
    assert a_lo < b_hi and b_lo < a_hi  # the independent intervals overlap
    assert (res.high - res.low) < 0.2 * (b_hi - b_lo)


def test_paired_bootstrap_is_seeded():
    d, c = docs(), scaled(docs(), 0.99, noise=0.05)
    args = (c["bits"], d["bytes"], d["bits"], d["bytes"], 300, 0.95)
    assert paired_bootstrap(*args, 0) == paired_bootstrap(*args, 0)
    assert paired_bootstrap(*args, 0) != paired_bootstrap(*args, 1)


# ------------------------------------------------------------------ no champion


def test_no_champion_within_bounds_promotes():
    d = decide_promotion(CHAMPION, None, POLICY)
    assert d.promote and d.verdict == "promote" and not d.has_champion
    assert any("no champion" in r for r in d.reasons)
    assert d.deltas == {} and d.paired is None


def test_no_champion_above_max_bits_per_byte_is_rejected():
    d = decide_promotion(CHAMPION, None, GatePolicy(max_bits_per_byte=1.2))
    assert not d.promote and d.verdict == "reject"
    assert d.reasons[0] == f"challenger bits per byte {CHAMPION.bits_per_byte:.4g} > maximum 1.2"


def test_no_champion_above_max_perplexity_is_rejected():
    d = decide_promotion(CHAMPION, None, GatePolicy(max_perplexity=10))
    assert not d.promote and "perplexity" in d.reasons[0] and "maximum 10" in d.reasons[0]


def test_below_min_accuracy_is_rejected_even_when_better():
    d = decide_promotion(report(scaled(docs(), 0.8)), CHAMPION, GatePolicy(min_accuracy=0.5))
    assert not d.promote
    assert "minimum 0.5" in d.reasons[0]


# ------------------------------------------------------------------ paired bits per byte


def test_a_model_against_itself_never_promotes_under_superiority():
    d = decide_promotion(CHAMPION, CHAMPION, POLICY)
    assert not d.promote
    assert d.paired.diff == 0 and d.paired.ci == (0.0, 0.0)
    assert "not significantly better, the champion stays" in d.reasons[0]
    # ... and is not worse, so non-inferiority lets it through.
    assert decide_promotion(CHAMPION, CHAMPION, NONINF).promote


def test_clearly_better_promotes_under_both_modes():
    ch = report(scaled(docs(), 0.97, noise=0.05))
    for policy in (POLICY, NONINF):
        d = decide_promotion(ch, CHAMPION, policy)
        assert d.promote, d.reasons
    d = decide_promotion(ch, CHAMPION, POLICY)
    assert d.deltas["bits_per_byte_rel"] == pytest.approx(-0.03, abs=0.002)
    lo, hi = d.paired.ci
    assert lo < d.paired.diff < hi < 0
    assert d.deltas["bits_per_byte_ci_high"] == hi
    assert any("significantly better" in r for r in d.reasons)


@pytest.mark.parametrize("seed", range(5))
def test_noise_level_difference_does_not_flip_the_champion_under_superiority(seed):
    # Per-document noise of 5% with no systematic change: the point estimate is a hair
    # better or worse; superiority keeps the champion, non-inferiority takes the new one.
    ch = report(scaled(docs(), 1.0, noise=0.05, seed=seed))
    d = decide_promotion(ch, CHAMPION, POLICY)
    assert not d.promote, d.reasons
    lo, hi = d.paired.ci
    assert lo < 0 < hi
    assert decide_promotion(ch, CHAMPION, NONINF).promote


def test_point_better_by_noise_was_promoted_by_the_old_rule_and_is_not_now():
    # The case that motivated the paired gate: the point estimate IS lower (0.2%), which
    # the old "min_relative_improvement: 0" rule promoted; the interval straddles zero.
    ch = report(scaled(docs(), 0.998, noise=0.05, seed=3))
    d = decide_promotion(ch, CHAMPION, POLICY)
    assert d.deltas["bits_per_byte_rel"] < 0
    assert d.paired.ci[0] < 0 < d.paired.ci[1]
    assert not d.promote


def test_significantly_worse_is_rejected_by_non_inferiority_unless_inside_the_margin():
    ch = report(scaled(docs(), 1.03, noise=0.05))
    d = decide_promotion(ch, CHAMPION, NONINF)
    assert not d.promote and "significantly worse" in d.reasons[0]
    assert d.paired.ci[0] > 0
    # 3% worse is inside a 5% margin: the interval is not wholly above +5%.
    assert decide_promotion(
        ch, CHAMPION, GatePolicy(mode="non_inferiority", margins={"bits_per_byte": 0.05})
    ).promote
    assert decide_promotion(
        ch, CHAMPION, GatePolicy(mode="non_inferiority", non_inferiority_margin=0.05)
    ).promote


@pytest.mark.parametrize(("required", "promote"), [(0.01, True), (0.05, False)])
def test_min_relative_improvement_is_held_against_the_whole_interval(required, promote):
    ch = report(scaled(docs(), 0.97, noise=0.02))
    d = decide_promotion(ch, CHAMPION, GatePolicy(min_relative_improvement=required))
    assert d.promote is promote, d.reasons
    assert d.paired.threshold == pytest.approx(-required * d.paired.champion_bits_per_byte)


def test_perplexity_of_another_tokenizer_cannot_win_the_gate():
    # A challenger with a finer vocabulary: 2x the tokens for the same text, so its
    # per-token perplexity is far LOWER, but it spends 4% more bits on the same bytes.
    base = docs()
    finer = {**scaled(base, 1.04, noise=0.02), "tokens": base["tokens"] * 2}
    ch = report(finer, tokenizer="tok-b")
    assert ch.perplexity < 0.6 * CHAMPION.perplexity
    for policy in (POLICY, NONINF):
        d = decide_promotion(ch, CHAMPION, policy)
        assert not d.promote, d.reasons
        assert d.paired.accuracy_compared is False
        assert any("accuracy not compared" in r for r in d.reasons)
    # And the reverse: a coarser vocabulary (higher perplexity) with fewer bits per byte wins.
    coarse = {**scaled(base, 0.96, noise=0.02), "tokens": base["tokens"] // 2 + 1}
    ch = report(coarse, tokenizer="tok-c")
    assert ch.perplexity > 1.5 * CHAMPION.perplexity
    assert decide_promotion(ch, CHAMPION, POLICY).promote


def test_significant_accuracy_drop_with_a_shared_tokenizer_rejects():
    base = docs()
    worse_acc = {**scaled(base, 0.97, noise=0.02), "correct": (base["correct"] * 0.9).astype(int)}
    d = decide_promotion(report(worse_acc), CHAMPION, POLICY)
    assert not d.promote
    assert d.reasons[0].startswith("accuracy ") and "McNemar over documents" in d.reasons[0]
    assert d.paired.champion_better_docs > 150 and d.paired.mcnemar_p < 1e-6
    # Inside a 15% accuracy margin the drop is allowed.
    policy = GatePolicy(margins={"accuracy": 0.15})
    assert decide_promotion(report(worse_acc), CHAMPION, policy).promote


def test_an_accuracy_drop_that_is_not_significant_does_not_block():
    base = docs()
    rng = np.random.default_rng(7)
    # One token fewer right on 11 documents, one more on 9: lower, but p ~ 0.8.
    correct = base["correct"].copy()
    picks = rng.choice(N_DOCS, 20, replace=False)
    correct[picks[:11]] -= 1
    correct[picks[11:]] += 1
    ch = report({**scaled(base, 0.97, noise=0.02), "correct": correct})
    d = decide_promotion(ch, CHAMPION, POLICY)
    assert ch.accuracy < CHAMPION.accuracy
    assert d.promote, d.reasons
    assert (d.paired.challenger_better_docs, d.paired.champion_better_docs) == (9, 11)
    assert d.paired.mcnemar_p == pytest.approx(mcnemar_exact(9, 11))


def test_pairs_by_document_id_not_by_position():
    base = docs()
    better = scaled(base, 0.97, noise=0.02)
    order = np.random.default_rng(3).permutation(N_DOCS)
    ids = [f"doc-{i:04d}" for i in range(N_DOCS)]
    shuffled = report({k: v[order] for k, v in better.items()}, ids=[ids[i] for i in order])
    a = decide_promotion(report(better), CHAMPION, POLICY)
    b = decide_promotion(shuffled, CHAMPION, POLICY)
    assert b.promote and b.paired.diff == pytest.approx(a.paired.diff)
    # A positional pairing of the shuffled report would be noise: the ids make it exact.
    assert b.paired.ci[1] - b.paired.ci[0] == pytest.approx(
        a.paired.ci[1] - a.paired.ci[0], rel=0.2
    )


def test_partial_overlap_pairs_the_common_documents_and_says_so():
    base = docs()
    ch = report({k: v[:150] for k, v in scaled(base, 0.97, noise=0.02).items()})
    d = decide_promotion(ch, CHAMPION, POLICY)
    assert d.promote and d.paired.n_docs == 150
    assert any(
        "paired on 150 documents of 150 (challenger) and 200 (champion)" in r for r in d.reasons
    )


def test_without_per_document_scores_there_is_no_comparison():
    d = decide_promotion(report(per_doc=False), CHAMPION, NONINF)
    assert not d.promote and "no per-document scores" in d.reasons[0]
    d = decide_promotion(CHAMPION, report(per_doc=False), NONINF)
    assert not d.promote and "champion's report" in d.reasons[0]


# ------------------------------------------------------------------ never pass


@pytest.mark.parametrize(
    "challenger",
    [
        report(bits_per_byte=NAN),
        report(bits_per_byte=INF),
        report(perplexity=NAN),
        report(perplexity=INF),
        report(accuracy=NAN),
        report(bits_per_byte_ci=(1.4, INF)),
        report(mean_nll=NAN),
    ],
    ids=["nan-bpb", "inf-bpb", "nan-ppl", "inf-ppl", "nan-acc", "inf-ci", "nan-nll"],
)
@pytest.mark.parametrize("with_champion", [False, True])
@pytest.mark.parametrize("mode", ["superiority", "non_inferiority"])
def test_non_finite_challenger_never_passes(challenger, with_champion, mode):
    policy = GatePolicy(
        mode=mode, max_perplexity=1e300, max_bits_per_byte=1e300, non_inferiority_margin=1e6
    )
    d = decide_promotion(challenger, CHAMPION if with_champion else None, policy)
    assert not d.promote
    assert "non-finite" in d.reasons[0]


def test_non_finite_per_document_bits_never_pass():
    # A diverged document makes the paired interval non-finite even if a headline number
    # were (wrongly) finite.
    d = docs()
    bad = {**d, "bits": np.where(np.arange(N_DOCS) == 3, np.inf, d["bits"])}
    rep = report(bad, bits_per_byte=1.4, perplexity=30.0, mean_nll=3.4)
    res = decide_promotion(rep, CHAMPION, NONINF)
    assert not res.promote and "not finite" in res.reasons[0]


def test_non_finite_champion_never_passes():
    d = decide_promotion(CHAMPION, report(bits_per_byte=NAN), NONINF)
    assert not d.promote and "champion has non-finite" in d.reasons[0]


def test_nan_survives_the_json_round_trip_and_is_rejected():
    text = report(bits_per_byte=NAN).to_json()
    assert "NaN" in text
    back = EvalReport.from_json(text)
    assert math.isnan(back.bits_per_byte)
    assert not decide_promotion(back, None, POLICY).promote


def test_different_data_is_not_compared():
    d = decide_promotion(report(scaled(docs(), 0.5), data="aaa"), report(data="bbb"), NONINF)
    assert not d.promote and "different data" in d.reasons[0]


def _gen(passed: bool) -> GenerationCheck:
    return GenerationCheck(
        prompt="def f",
        output="x x x x" if not passed else "return 1",
        new_tokens=4,
        seconds_per_token=0.01,
        repetition=0.9 if not passed else 0.0,
        non_empty=True,
        degenerate=not passed,
    )


def test_generation_checks_block_only_when_required():
    ch = report(generation=[_gen(True), _gen(False)])
    assert decide_promotion(ch, None, POLICY).promote
    d = decide_promotion(ch, None, GatePolicy(require_generation_checks=True))
    assert not d.promote and "generation checks failed for 1" in d.reasons[0]


def test_required_generation_checks_that_never_ran_do_not_pass():
    d = decide_promotion(report(), None, GatePolicy(require_generation_checks=True))
    assert not d.promote and "none ran" in d.reasons[0]


# ------------------------------------------------------------------ the record


def test_the_decision_is_pure_and_repeatable():
    ch = report(scaled(docs(), 0.995, noise=0.05))
    before = (ch.model_dump(), CHAMPION.model_dump())
    a, b = decide_promotion(ch, CHAMPION, POLICY), decide_promotion(ch, CHAMPION, POLICY)
    assert a == b
    assert (ch.model_dump(), CHAMPION.model_dump()) == before
    other_seed = decide_promotion(ch, CHAMPION, GatePolicy(seed=1))
    assert other_seed.paired.ci != a.paired.ci


def test_markdown_shows_the_paired_difference_its_interval_and_the_test():
    ch = report(scaled(docs(), 0.97, noise=0.05), generation=[_gen(True)])
    d = decide_promotion(ch, CHAMPION, POLICY)
    md = d.to_markdown(ch, CHAMPION)
    t = d.paired
    assert "**PROMOTE**" in md
    assert "| bits_per_byte (lower is better; decides) |" in md
    assert "### Paired comparison (same documents)" in md
    assert (
        f"| {t.diff:+.4f} ({t.diff_rel:+.2%}) | [{t.ci[0]:+.4f}, {t.ci[1]:+.4f}] | +0.0000 |" in md
    )
    assert "paired bootstrap (2000 resamples) | 200 |" in md
    assert "McNemar exact over documents | 200 |" in md and f"p = {t.mcnemar_p:.4g}" in md
    assert "Policy: mode superiority at 95% confidence" in md
    assert "### Reasons" in md and all(r in md for r in d.reasons)
    assert "Generation checks" in md
    md0 = decide_promotion(ch, None, POLICY).to_markdown(ch, None)
    assert "| none |" in md0 and "Paired comparison" not in md0
    other = report(tokenizer="tok-z")
    md2 = decide_promotion(ch, other, POLICY).to_markdown(ch, other)
    assert "not compared: the models have different tokenizers" in md2


def test_decision_round_trips_through_json():
    for champion in (report(bits_per_byte=NAN), CHAMPION):
        d = decide_promotion(report(scaled(docs(), 0.97)), champion, POLICY)
        back = Decision.from_json(d.to_json())
        assert back == d


def test_margins_reject_unknown_metrics():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown metric"):
        GatePolicy(margins={"bleu": 0.1})
    with pytest.raises(ValidationError, match="not compared across models"):
        GatePolicy(margins={"perplexity": 0.1})


def test_default_mode_is_superiority():
    assert GatePolicy().mode == "superiority" and GatePolicy().confidence == 0.95


def test_required_generation_checks_without_prompts_is_a_config_error():
    from flywheel.config import DEFAULT_PROFILE, load_profile
    from flywheel.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_profile(None, ["gate.require_generation_checks=true"])
    msg = str(err.value)
    assert "gate.require_generation_checks" in msg and "eval.prompts" in msg
    assert msg.startswith(str(DEFAULT_PROFILE)) and "\n" not in msg
    profile = load_profile(None, ["gate.require_generation_checks=true", "eval.prompts=[def f]"])
    assert profile.gate.require_generation_checks


def test_the_run_summary_shows_bits_per_byte_and_the_paired_difference(state_dir):
    # The gate stage's ledger entry (as `stages.gate` writes it) read back by `run_facts`,
    # through a real MLflow store in a temporary state directory.
    from flywheel import ledger
    from flywheel.config import Profile
    from flywheel.summary import run_facts

    profile = Profile()
    ch = report(scaled(docs(), 0.97, noise=0.05))
    decision = decide_promotion(ch, CHAMPION, POLICY)
    metrics = {
        **ch.metrics("challenger_"),
        **CHAMPION.metrics("champion_"),
        **{f"delta_{k}": v for k, v in decision.deltas.items()},
        "stage_seconds": 1.0,
    }
    ledger.record(profile, "run-1", "gate", metrics, {"verdict": "promote", "version": "2"})
    facts = run_facts(profile, "run-1")
    assert facts["challenger_bits_per_byte"] == round(ch.bits_per_byte, 4)
    assert facts["champion_bits_per_byte"] == round(CHAMPION.bits_per_byte, 4)
    assert facts["bits_per_byte_paired_abs"] == round(decision.paired.diff, 4)
    lo, hi = decision.paired.ci
    assert (facts["bits_per_byte_ci_low"], facts["bits_per_byte_ci_high"]) == (
        round(lo, 4),
        round(hi, 4),
    )
    # The keys the pipeline tests and `flywheel run` read stay.
    assert facts["challenger_perplexity"] == round(ch.perplexity, 3)
    assert "champion_perplexity" in facts and facts["verdict"] == "promote"
