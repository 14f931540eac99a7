"""The promotion gate, case by case. Pure: reports are built in memory."""

from __future__ import annotations

import math

import pytest

from flywheel.config import GatePolicy
from flywheel.evaluate.report import EvalReport, GenerationCheck
from flywheel.gate import Decision, decide_promotion

NAN, INF = math.nan, math.inf


def report(ppl: float, acc: float = 0.3, *, data: str = "abc123", spread: float = 0.02, **kw):
    return EvalReport(
        model=kw.pop("model", "models:/m@x"),
        model_dir="/tmp/m",
        dataset="/tmp/ds",
        data_hash=data,
        perplexity=ppl,
        perplexity_ci=(ppl * (1 - spread), ppl * (1 + spread)),
        accuracy=acc,
        accuracy_ci=(acc - 0.01, acc + 0.01),
        mean_nll=math.log(ppl) if ppl > 0 and math.isfinite(ppl) else ppl,
        confidence=0.95,
        bootstrap_samples=200,
        n_docs=200,
        n_tokens=20_000,
        seconds=1.0,
        **kw,
    )


POLICY = GatePolicy()


def test_no_champion_within_bounds_promotes():
    d = decide_promotion(report(50.0), None, POLICY)
    assert d.promote and d.verdict == "promote" and not d.has_champion
    assert any("no champion" in r for r in d.reasons)
    assert d.deltas == {}


def test_no_champion_above_max_perplexity_is_rejected():
    d = decide_promotion(report(2e4), None, GatePolicy(max_perplexity=1e4))
    assert not d.promote and d.verdict == "reject"
    assert "maximum 10000" in d.reasons[0]


def test_below_min_accuracy_is_rejected_even_when_better():
    d = decide_promotion(
        report(40.0, acc=0.05), report(50.0, acc=0.04), GatePolicy(min_accuracy=0.1)
    )
    assert not d.promote
    assert "minimum 0.1" in d.reasons[0]


def test_challenger_better_promotes():
    d = decide_promotion(report(40.0, acc=0.32), report(50.0, acc=0.30), POLICY)
    assert d.promote
    assert d.deltas["perplexity_rel"] == pytest.approx(-0.2)
    assert d.deltas["perplexity_abs"] == pytest.approx(-10.0)
    assert d.deltas["accuracy_rel"] == pytest.approx(0.02 / 0.30)


def test_champion_better_is_rejected():
    d = decide_promotion(report(55.0), report(50.0), POLICY)
    assert not d.promote
    assert "10.00% higher" in d.reasons[0] and "at most 0.0% higher" in d.reasons[0]


def test_tie_with_zero_margin_is_not_worse_and_promotes():
    assert decide_promotion(report(50.0), report(50.0), POLICY).promote


@pytest.mark.parametrize(("ppl", "promote"), [(51.0, True), (52.4, True), (53.0, False)])
def test_non_inferiority_margin(ppl, promote):
    policy = GatePolicy(non_inferiority_margin=0.05)
    d = decide_promotion(report(ppl), report(50.0), policy)
    assert d.promote is promote, d.reasons


def test_per_metric_margin_overrides_the_default():
    # 2% worse perplexity is inside the default 5%, but perplexity's own margin is 1%.
    policy = GatePolicy(non_inferiority_margin=0.05, margins={"perplexity": 0.01})
    assert not decide_promotion(report(51.0), report(50.0), policy).promote
    # Accuracy 4% lower (relative) is inside the default 5%.
    assert decide_promotion(report(50.0, acc=0.288), report(50.0, acc=0.30), policy).promote


def test_accuracy_drop_beyond_margin_rejects_despite_better_perplexity():
    d = decide_promotion(report(45.0, acc=0.20), report(50.0, acc=0.30), POLICY)
    assert not d.promote
    assert d.reasons[0].startswith("accuracy 33.33% lower")


@pytest.mark.parametrize(("ppl", "promote"), [(48.5, False), (45.0, True)])
def test_min_relative_improvement_requires_superiority(ppl, promote):
    policy = GatePolicy(min_relative_improvement=0.05, non_inferiority_margin=0.5)
    d = decide_promotion(report(ppl), report(50.0), policy)
    assert d.promote is promote, d.reasons


@pytest.mark.parametrize(
    "challenger",
    [
        report(NAN),
        report(INF),
        report(40.0, acc=NAN),
        report(40.0).model_copy(update={"perplexity_ci": (39.0, INF)}),
        report(40.0).model_copy(update={"mean_nll": NAN}),
    ],
    ids=["nan-ppl", "inf-ppl", "nan-acc", "inf-ci", "nan-nll"],
)
@pytest.mark.parametrize("with_champion", [False, True])
def test_non_finite_challenger_never_passes(challenger, with_champion):
    policy = GatePolicy(max_perplexity=1e300, non_inferiority_margin=1e6)
    d = decide_promotion(challenger, report(50.0) if with_champion else None, policy)
    assert not d.promote
    assert "non-finite" in d.reasons[0]


def test_non_finite_champion_never_passes():
    d = decide_promotion(report(40.0), report(NAN), POLICY)
    assert not d.promote and "champion has non-finite" in d.reasons[0]


def test_nan_survives_the_json_round_trip_and_is_rejected():
    text = report(NAN).to_json()
    assert "NaN" in text
    back = EvalReport.from_json(text)
    assert math.isnan(back.perplexity)
    assert not decide_promotion(back, None, POLICY).promote


def test_different_data_is_not_compared():
    d = decide_promotion(report(10.0, data="aaa"), report(50.0, data="bbb"), POLICY)
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
    ch = report(40.0, generation=[_gen(True), _gen(False)])
    assert decide_promotion(ch, None, POLICY).promote
    d = decide_promotion(ch, None, GatePolicy(require_generation_checks=True))
    assert not d.promote and "generation checks failed for 1" in d.reasons[0]


def test_markdown_shows_metrics_deltas_intervals_verdict_and_reasons():
    ch, cp = report(40.0, acc=0.32, generation=[_gen(True)]), report(50.0, acc=0.30)
    d = decide_promotion(ch, cp, POLICY)
    md = d.to_markdown(ch, cp)
    assert "**PROMOTE**" in md
    assert "| perplexity (lower is better) | 40 | [39.2, 40.8] | 50 | [49, 51] | -20.00% |" in md
    assert "accuracy" in md and "+6.67%" in md
    assert "### Reasons" in md and all(r in md for r in d.reasons)
    assert "Generation checks" in md
    md0 = decide_promotion(ch, None, POLICY).to_markdown(ch, None)
    assert "| none |" in md0


def test_decision_round_trips_through_json():
    d = decide_promotion(report(40.0), report(NAN), POLICY)
    back = Decision.from_json(d.to_json())
    assert back == d


def test_margins_reject_unknown_metrics():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown metric"):
        GatePolicy(margins={"bleu": 0.1})
