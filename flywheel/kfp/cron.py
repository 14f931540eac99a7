"""Standard 5-field cron -> the 6-field cron Kubeflow Pipelines schedules with.

KFP's ScheduledWorkflow controller parses cron with robfig/cron's default parser:
six fields, *seconds first*, so the familiar ``0 3 * * *`` pasted as is would be
read as "second 0 of minute 3 of every hour of day-of-month *" - a silent, wrong
schedule, or an outright parse error. People write 5-field cron; croniter reads it
(names, ranges, steps, ``?``) and tells whether it ever fires, and this module adds only
KFP's conventions: the ``0`` seconds field, weekday ``7`` spelled as ``0`` (robfig accepts
0-6), the macros robfig knows, and a refusal of what croniter accepts but robfig does not
(Quartz's ``L``, ``W``, ``#``, Jenkins' ``H``/``R``, wrap-around ranges such as ``5-1``),
each with the field named, so a bad expression fails before anything is uploaded.
"""

from __future__ import annotations

import re
from datetime import datetime

from croniter import CroniterBadDateError, CroniterError, croniter

from flywheel.errors import ConfigError

MACROS: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# (name, lowest, highest value a user may write); weekday 7 is Sunday, rewritten to 0.
_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_QUESTION_FIELDS = ("day-of-month", "day-of-week")
_QUARTZ = re.compile(r"\d*L\d*|\d+W|LW")


def _check_field(expr: str, index: int, text: str) -> set[int]:
    """Refuse what robfig would not take; returns the literal values written in the field."""
    name, low, high = _FIELDS[index]
    names = croniter.ALPHACONV[index]  # month / weekday names, as croniter reads them
    written: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ConfigError(f"cron '{expr}': empty list item in {name} '{text}'")
        rng, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            raise ConfigError(f"cron '{expr}': {name} step '{step}' must be a positive number")
        bounds: list[int] = []
        for token in rng.split("-"):
            if token in ("*", "?"):
                if token == "?" and name not in _QUESTION_FIELDS:
                    raise ConfigError(
                        f"cron '{expr}': '?' is only allowed in day-of-month and day-of-week"
                    )
                continue
            if "#" in token or _QUARTZ.fullmatch(token.upper()):
                raise ConfigError(
                    f"cron '{expr}': {name} '{token}' uses a Quartz extension (L, W, #) "
                    "that Kubeflow's scheduler does not support"
                )
            value = names.get(token.lower())
            if not isinstance(value, int):
                if not token.isdigit():
                    raise ConfigError(
                        f"cron '{expr}': {name} value '{token}' is not a number or name"
                    )
                value = int(token)
                if not low <= value <= high:
                    raise ConfigError(
                        f"cron '{expr}': {name} value {value} is outside {low}-{high}"
                    )
            bounds.append(value)
        # croniter wraps `5-1` around; robfig refuses it.
        if len(bounds) == 2 and bounds[0] > bounds[1]:
            raise ConfigError(f"cron '{expr}': {name} range '{rng}' starts after it ends")
        written.update(bounds)
    return written


def to_kfp_cron(expr: str) -> str:
    """`0 3 * * *` -> `0 0 3 * * *`. Raises ConfigError naming the bad field."""
    raw = " ".join(expr.split())
    if not raw:
        raise ConfigError("cron expression is empty; expected 5 fields, e.g. '0 3 * * *'")
    if raw.startswith("@"):
        if raw.lower() not in MACROS:
            raise ConfigError(
                f"cron '{expr}': unknown macro; supported: {', '.join(sorted(MACROS))}"
            )
        raw = MACROS[raw.lower()]
    fields = raw.split(" ")
    if len(fields) != 5:
        hint = (
            " (6 fields looks like KFP's seconds-first format: give the standard 5 fields, "
            "the seconds field is added for you)"
            if len(fields) == 6
            else ""
        )
        raise ConfigError(
            f"cron '{expr}': expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}{hint}"
        )
    written = [_check_field(expr, i, text) for i, text in enumerate(fields)]
    try:
        expanded = croniter.expand(raw)[0]
        if expanded[4] == ["*"]:
            # With a weekday set the day matches by weekday (OR), so it always fires;
            # without one, day 31 of February never does. A fixed start keeps this pure.
            croniter(raw, datetime(2001, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ConfigError(
            f"cron '{expr}': day-of-month never occurs in the given month(s)"
        ) from None
    except CroniterError as err:
        raise ConfigError(f"cron '{expr}': {err}") from None
    out = list(fields)
    if 7 in written[4]:
        # robfig rejects weekday 7; croniter's expansion spells the set with Sunday as 0.
        out[4] = ",".join(str(day) for day in expanded[4])
    return "0 " + " ".join(out)
