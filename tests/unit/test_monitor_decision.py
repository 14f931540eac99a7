"""The monitor's retrain decision, case by case (pure)."""

from flywheel.monitor import decide_retrain

HOUR = 3600.0
NOW = 1_000_000.0


def decide(**kw):
    args = dict(
        drifted=True,
        drift_reason="drift: 0.8",
        now=NOW,
        last_event=None,
        cooldown_s=24 * HOUR,
        in_flight=[],
    )
    args.update(kw)
    return decide_retrain(**args)


def test_drift_with_no_history_retrains():
    d = decide()
    assert d.retrain and d.reason == "drift: 0.8"


def test_no_drift_never_retrains():
    d = decide(drifted=False, drift_reason="0.1 (0/5 features)")
    assert not d.retrain and d.reason.startswith("no drift")


def test_cooldown_blocks_then_expires():
    blocked = decide(last_event=NOW - 2 * HOUR)
    assert not blocked.retrain and "cooldown (22.0 h left)" in blocked.reason
    assert decide(last_event=NOW - 25 * HOUR).retrain


def test_retrain_in_flight_blocks_even_outside_cooldown():
    d = decide(last_event=NOW - 48 * HOUR, in_flight=["retrain-2026-11-21"])
    assert not d.retrain and "in flight: retrain-2026-11-21" in d.reason


def test_zero_cooldown_allows_back_to_back():
    assert decide(last_event=NOW - 1, cooldown_s=0).retrain
