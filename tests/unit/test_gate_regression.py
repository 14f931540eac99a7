"""Rule 8, no forgetting (pure): a challenger better on the new held-out split but worse on
the pinned regression set (the champion's domain) beyond gate.regression_margin is
rejected, and the decision shows both comparisons."""

from __future__ import annotations

import pytest
from test_gate import CHAMPION, POLICY, docs, report, scaled

from flywheel.config import GatePolicy
from flywheel.gate import decide_promotion

# Better on the window's held-out split: a retrain on the drifted data wins there.
BETTER_NEW = report(scaled(docs(), 0.90, noise=0.05))
OLD_DOMAIN = docs(seed=5, n=120)
REG_CHAMPION = report(OLD_DOMAIN, data="old-domain", ids=[f"old-{i}" for i in range(120)])


def _reg(factor: float):
    ids = [f"old-{i}" for i in range(120)]
    return report(scaled(OLD_DOMAIN, factor, noise=0.05), data="old-domain", ids=ids)


def test_forgetting_the_champions_domain_is_rejected_although_better_on_the_new_data():
    d = decide_promotion(BETTER_NEW, CHAMPION, POLICY, regression=(_reg(1.10), REG_CHAMPION))
    assert not d.promote
    assert d.paired is not None and d.paired.ci[1] < 0  # significantly better on the new split
    r = d.regression
    assert r is not None and r.n_docs == 120
    assert r.ci[0] > r.threshold == pytest.approx(0.02 * r.champion_bits_per_byte)
    assert d.reasons[0].startswith("regression set (the champion's domain): paired difference +")
    assert "forgot the champion's domain" in d.reasons[0]
    assert d.deltas["regression_bits_per_byte_rel"] == pytest.approx(0.10, abs=0.01)
    md = d.to_markdown(BETTER_NEW, CHAMPION)
    assert "### Paired comparison" in md and "### Regression set (the champion's domain)" in md


@pytest.mark.parametrize(("factor", "promote"), [(1.0, True), (1.01, True), (0.95, True)])
def test_no_regression_beyond_the_margin_keeps_the_promotion(factor, promote):
    d = decide_promotion(BETTER_NEW, CHAMPION, POLICY, regression=(_reg(factor), REG_CHAMPION))
    assert d.promote is promote, d.reasons
    assert any("no forgetting beyond the margin" in r for r in d.reasons)


def test_the_margin_is_the_policys_own():
    worse = (_reg(1.10), REG_CHAMPION)
    assert not decide_promotion(BETTER_NEW, CHAMPION, POLICY, regression=worse).promote
    lenient = GatePolicy(regression_margin=0.2)
    assert decide_promotion(BETTER_NEW, CHAMPION, lenient, regression=worse).promote


def test_without_a_regression_set_or_a_champion_nothing_changes():
    assert decide_promotion(BETTER_NEW, CHAMPION, POLICY).regression is None
    d = decide_promotion(BETTER_NEW, None, POLICY, regression=(_reg(1.5), REG_CHAMPION))
    assert d.promote and d.regression is None  # no champion: nothing to forget


def test_unpaired_regression_reports_are_a_failure_not_a_pass():
    other_ids = report(OLD_DOMAIN, ids=[f"x-{i}" for i in range(120)])
    d = decide_promotion(BETTER_NEW, CHAMPION, POLICY, regression=(other_ids, REG_CHAMPION))
    assert not d.promote and "only 0 document(s) scored by both" in d.reasons[0]
