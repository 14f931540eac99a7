"""Issue 24, rule 6: a statistic computed on too few rows is "cannot decide", never "no
drift" or "not worse".

Distribution drift: a feature whose statistic is NaN (Evidently's text classifier on a
one-record window) is unknown; "no drift" needs every feature measured. Performance drift:
fewer than MIN_DOCS scored documents on a side gives no interval, and the champion is then
neither worse nor not worse. The monitor's decision carries `decided`; `check` and `drift
check` turn an undecided one into one line and exit 1 (a scheduled monitor must not pass).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from fixtures_cli import flywheel, nonblank

from flywheel.degradation import MIN_DOCS, PerformanceDrift, relative_degradation
from flywheel.drift import FeatureDrift, drift_vote
from flywheel.monitor import CANNOT_DECIDE, decide_retrain

NAN = math.nan


def _f(score: float, drifted: bool = False) -> FeatureDrift:
    return FeatureDrift(method="m", score=score, threshold=0.5, drifted=drifted)


@pytest.mark.parametrize(
    ("features", "share", "want"),
    [
        # the case: one window row, the text statistic NaN, the rest quiet
        ({"text": _f(NAN), "length": _f(0.77), "non_ascii_share": _f(1.0)}, 0.5, (False, False)),
        ({"text": _f(NAN), "length": _f(0.01, True), "oov": _f(0.02, True)}, 0.5, (True, True)),
        ({"text": _f(NAN), "length": _f(0.01, True), "oov": _f(0.9)}, 0.5, (False, False)),
        ({"text": _f(0.52), "length": _f(0.3), "oov": _f(0.9)}, 0.5, (True, False)),
        ({"text": _f(0.97, True), "length": _f(0.3), "oov": _f(0.9)}, 0.3, (True, True)),
        ({"text": _f(float("inf")), "length": _f(0.3)}, 0.5, (False, False)),
    ],
)
def test_drift_vote_never_reads_an_unmeasured_feature_as_quiet(features, share, want):
    assert drift_vote(features, share) == want


def _docs(n: int, bits: float) -> tuple[np.ndarray, np.ndarray]:
    nbytes = np.full(n, 100.0)
    return nbytes * bits, nbytes


@pytest.mark.parametrize(("n_window", "n_reference"), [(1, 200), (200, 1), (0, 200), (1, 1)])
def test_too_few_documents_cannot_decide_degradation(n_window, n_reference):
    d = relative_degradation(*_docs(n_window, 4.2), *_docs(n_reference, 2.0), 1000, 0.95, 0)
    assert not d.decided
    assert not d.degraded(0.05)
    assert f"at least {MIN_DOCS} each" in d.describe()
    assert "nan" not in d.describe()


def test_enough_documents_decide():
    rng = np.random.default_rng(0)
    bits_w = rng.normal(420, 5, 50)
    bits_r = rng.normal(200, 5, 50)
    d = relative_degradation(bits_w, np.full(50, 100.0), bits_r, np.full(50, 100.0), 500, 0.95, 0)
    assert d.decided and d.degraded(0.05)


WORSE = PerformanceDrift(2.40, 2.00, 0.20, 0.15, 0.25, 200, 200, 0.95)
SAME = PerformanceDrift(2.02, 2.00, 0.01, -0.03, 0.05, 200, 200, 0.95)
# the case: a champion 107% worse on a one-record window, no interval
UNKNOWN = PerformanceDrift(4.14, 2.00, 1.07, NAN, NAN, 1, 200, 0.95)
DRIFT, NO_DRIFT, NAN_DRIFT = "drift: 0.94 (2/3)", "no drift: 0.5 (0/3)", "cannot decide: nan"


def _decide(trigger, drifted, performance):
    reason = {True: DRIFT, False: NO_DRIFT, None: NAN_DRIFT}[drifted]
    return decide_retrain(
        trigger=trigger,
        drifted=drifted,
        drift_reason=reason,
        performance=performance,
        min_degradation=0.05,
        now=1e6,
        last_event=None,
        cooldown_s=0,
        in_flight=[],
    )


@pytest.mark.parametrize(
    ("trigger", "drifted", "performance", "want"),
    [
        # undecided: a signal the trigger needs is unknown and the other does not settle it
        ("both", True, UNKNOWN, None),
        ("both", None, WORSE, None),
        ("both", None, UNKNOWN, None),
        ("distribution", None, SAME, None),
        ("performance", True, UNKNOWN, None),
        # decided: the unknown signal cannot change the verdict
        ("both", False, UNKNOWN, False),
        ("both", None, SAME, False),
        ("distribution", True, UNKNOWN, True),
        ("performance", None, WORSE, True),
        ("performance", None, SAME, False),
    ],
)
def test_the_decision_is_undecided_only_when_an_unknown_signal_matters(
    trigger, drifted, performance, want
):
    d = _decide(trigger, drifted, performance)
    if want is None:
        assert not d.decided and not d.retrain
        assert d.reason.startswith(CANNOT_DECIDE), d.reason
    else:
        assert d.decided and d.retrain is want, d.reason
        assert not d.reason.startswith(CANNOT_DECIDE)


def test_drift_check_on_a_one_record_window_cannot_decide(tmp_path):
    """Through the CLI with Evidently (drift.min_rows=1 is allowed): exit 1, one line, never
    'no drift' with exit 0."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    ref = [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for _ in range(120)]
    pd.DataFrame({"text": ref}).to_parquet(tmp_path / "ref.parquet")
    (tmp_path / "w.jsonl").write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    out = flywheel(
        tmp_path,
        "drift",
        "check",
        "--window",
        "w.jsonl",
        "--reference",
        "ref.parquet",
        "--out",
        "report",
        "drift.min_rows=1",
        timeout=300,
    )
    lines = nonblank(out.stderr)
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(lines) == 1 and "cannot decide" in lines[0], out.stderr
    assert "text not measurable on 1 window rows" in lines[0]
    assert "no drift" not in out.stdout
