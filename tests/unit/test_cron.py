import pytest

from flywheel.errors import ConfigError
from flywheel.kfp.cron import to_kfp_cron


@pytest.mark.parametrize(
    ("expr", "kfp"),
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("  0   3 * *  * ", "0 0 3 * * *"),
        ("*/15 9-17 * * MON-FRI", "0 */15 9-17 * * MON-FRI"),
        ("0 0 1,15 * *", "0 0 0 1,15 * *"),
        ("30 2 1-31/2 jan,jul *", "0 30 2 1-31/2 jan,jul *"),
        ("0 0 5/10 * ?", "0 0 0 5/10 * ?"),
        ("0 0 * * 7", "0 0 0 * * 0"),
        ("0 0 * * 5-7", "0 0 0 * * 0,5,6"),
        ("0 0 * * sun", "0 0 0 * * sun"),
        ("@daily", "0 0 0 * * *"),
        ("@midnight", "0 0 0 * * *"),
        ("@HOURLY", "0 0 * * * *"),
        ("@weekly", "0 0 0 * * 0"),
        ("@monthly", "0 0 0 1 * *"),
        ("@yearly", "0 0 0 1 1 *"),
        ("0 0 29 2 *", "0 0 0 29 2 *"),
    ],
)
def test_valid_expressions_get_a_seconds_field(expr, kfp):
    assert to_kfp_cron(expr) == kfp


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty"),
        ("0 3 * *", "expected 5 fields"),
        ("0 0 3 * * *", "seconds-first"),
        ("60 * * * *", "minute value 60 is outside 0-59"),
        ("0 24 * * *", "hour value 24"),
        ("0 0 0 * *", "day-of-month value 0"),
        ("0 0 * 13 *", "month value 13"),
        ("0 0 * * 8", "day-of-week value 8"),
        ("0 0 * * FUN", "day-of-week value 'FUN'"),
        ("*/0 * * * *", "step '0'"),
        ("5-1 * * * *", "starts after it ends"),
        ("0 0 L * *", "Quartz"),
        ("0 0 * * 5#3", "Quartz"),
        ("0 0 15W * *", "Quartz"),
        ("0 0 1,,2 * *", "empty list item"),
        ("? * * * *", "'?' is only allowed"),
        ("0 0 31 2 *", "never occurs"),
        ("0 0 31 4,6 *", "never occurs"),
        ("@reboot", "unknown macro"),
        ("@every 1h", "unknown macro"),
    ],
)
def test_invalid_expressions_fail_with_the_field_named(expr, message):
    with pytest.raises(ConfigError, match=message):
        to_kfp_cron(expr)


def test_weekday_and_month_names_in_ranges_are_not_mistaken_for_quartz():
    # WED contains W and JUL contains L: names, not Quartz's W/L.
    assert to_kfp_cron("0 0 * JUN-JUL WED-FRI") == "0 0 0 * JUN-JUL WED-FRI"


def test_day_31_with_a_weekday_restriction_is_allowed():
    # With a weekday set, day-of-month and day-of-week are OR-ed: this does fire.
    assert to_kfp_cron("0 0 31 2 MON") == "0 0 0 31 2 MON"


@pytest.mark.parametrize("expr", ["R * * * *", "H 3 * * *", "0 0 * * L5"])
def test_what_croniter_reads_but_kubeflow_does_not_is_refused(expr):
    # croniter knows Jenkins' H/R and a trailing-L weekday; robfig (KFP's parser) does not.
    with pytest.raises(ConfigError, match=r"minute value|Quartz"):
        to_kfp_cron(expr)
