"""The monitor's retrain decision, case by case (pure): every trigger x signal x guard."""

import itertools

import pytest

from flywheel.degradation import PerformanceDrift
from flywheel.monitor import decide_retrain

HOUR = 3600.0
NOW = 1_000_000.0
MIN = 0.05

# The champion's bits per byte on the window vs its held-out sample.
WORSE = PerformanceDrift(2.40, 2.00, 0.20, 0.15, 0.25, 200, 200, 0.95)  # interval above +5%
SAME = PerformanceDrift(2.02, 2.00, 0.01, -0.03, 0.05, 200, 200, 0.95)  # interval holds 0
SLIGHTLY = PerformanceDrift(2.08, 2.00, 0.04, 0.01, 0.07, 200, 200, 0.95)  # worse, under +5%
DRIFT = "drift: 0.94 (4/4 features)"
NO_DRIFT = "no drift: 0.52 (0/4 features)"


def decide(**kw):
    args = dict(
        trigger="both",
        drifted=True,
        drift_reason=DRIFT,
        performance=WORSE,
        min_degradation=MIN,
        now=NOW,
        last_event=None,
        cooldown_s=24 * HOUR,
        in_flight=[],
    )
    args.update(kw)
    return decide_retrain(**args)


# Which (drifted, degraded) signals fire each trigger: the policy, written out.
FIRES = {
    "distribution": {(True, True), (True, False)},
    "performance": {(True, True), (False, True)},
    "both": {(True, True)},
}
GUARDS = {
    "none": {},
    "cooldown": {"last_event": NOW - 2 * HOUR},
    "in-flight": {"last_event": NOW - 48 * HOUR, "in_flight": ["run-7"]},
    "cooldown+in-flight": {"last_event": NOW - 1 * HOUR, "in_flight": ["run-7"]},
}


@pytest.mark.parametrize(
    ("trigger", "drifted", "degraded", "guard"),
    list(itertools.product(FIRES, [True, False], [True, False], GUARDS)),
)
def test_every_trigger_signal_and_guard(trigger, drifted, degraded, guard):
    d = decide(
        trigger=trigger,
        drifted=drifted,
        drift_reason=DRIFT if drifted else NO_DRIFT,
        performance=WORSE if degraded else SAME,
        **GUARDS[guard],
    )
    fires = (drifted, degraded) in FIRES[trigger]
    assert d.retrain == (fires and guard == "none"), d.reason
    # the reason names the numbers behind both signals, whatever the verdict
    assert (DRIFT if drifted else NO_DRIFT) in d.reason
    perf = WORSE if degraded else SAME
    assert f"{perf.window_bpb:.3f} bits/byte on the window vs {perf.reference_bpb:.3f}" in d.reason
    assert f"{perf.low:+.1%}..{perf.high:+.1%}" in d.reason
    assert "drift.min_degradation +5.0%" in d.reason
    if fires and guard == "in-flight":
        assert d.reason.endswith("retrain already in flight: run-7")
    if fires and guard == "cooldown":
        assert d.reason.endswith("inside cooldown (22.0 h left)")
    if fires and guard == "cooldown+in-flight":
        assert "in flight: run-7" in d.reason  # the in-flight run is the more useful reason
    if not fires:
        assert "cooldown" not in d.reason and "in flight" not in d.reason


def test_default_policy_wording_names_what_is_missing():
    narrower = decide(performance=SAME)
    assert not narrower.retrain
    assert narrower.reason.startswith(f"{DRIFT}, but the champion is not significantly worse")
    quiet = decide(drifted=False, drift_reason=NO_DRIFT, performance=WORSE)
    assert not quiet.retrain and quiet.reason.startswith("no drift")
    fired = decide()
    assert fired.retrain and fired.reason.startswith(f"{DRIFT} and the champion is worse on it: ")


def test_performance_trigger_reason_leads_with_the_champion():
    d = decide(trigger="performance", drifted=False, drift_reason=NO_DRIFT)
    assert d.retrain and d.reason.startswith("champion worse on the window: champion 2.400")
    assert not decide(trigger="performance", performance=SAME).retrain


def test_worse_but_under_min_degradation_does_not_count():
    assert not decide(performance=SLIGHTLY).retrain
    assert decide(performance=SLIGHTLY, min_degradation=0.0).retrain
    assert not decide(performance=WORSE, min_degradation=0.2).retrain  # low 0.15 < 0.2


def test_unmeasured_performance_never_fires_the_performance_part():
    for trigger in ("performance", "both"):
        d = decide(trigger=trigger, performance=None)
        assert not d.retrain and "not measured" in d.reason
    assert decide(trigger="distribution", performance=None).retrain


def test_cooldown_expires_and_zero_cooldown_allows_back_to_back():
    assert not decide(last_event=NOW - 23.9 * HOUR).retrain
    assert decide(last_event=NOW - 25 * HOUR).retrain
    assert decide(last_event=NOW - 1, cooldown_s=0).retrain
