"""Standard 5-field cron -> the 6-field cron Kubeflow Pipelines schedules with.

KFP's ScheduledWorkflow controller parses cron with robfig/cron's default parser:
six fields, *seconds first*, so the familiar ``0 3 * * *`` pasted as is would be
read as "second 0 of minute 3 of every hour of day-of-month *" - a silent, wrong
schedule, or an outright parse error. People write 5-field cron; we validate it here
(a bad expression fails before anything is uploaded) and prepend ``0`` seconds.

Accepted syntax per field: ``*``, ``N``, ``A-B``, lists ``A,B``, steps ``*/S``, ``A-B/S``
and ``A/S`` (robfig: A to the field's maximum), month and weekday names
(``JAN``..``DEC``, ``SUN``..``SAT``, any case), ``?`` in day-of-month/day-of-week,
weekday ``7`` as Sunday (rewritten to ``0``: robfig accepts only 0-6), and the macros
``@yearly @annually @monthly @weekly @daily @midnight @hourly``. Quartz extensions
(``L``, ``W``, ``#``), ``@reboot`` and ``@every`` are rejected: KFP cannot honour them.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

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

_MONTHS = {name.upper(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int  # highest value a user may write
    star_high: int  # highest value `*` covers (weekday: 6, although 7 is accepted)
    names: dict[str, int]
    question: bool  # `?` allowed


_FIELDS = (
    _Field("minute", 0, 59, 59, {}, False),
    _Field("hour", 0, 23, 23, {}, False),
    _Field("day-of-month", 1, 31, 31, {}, True),
    _Field("month", 1, 12, 12, _MONTHS, False),
    _Field("day-of-week", 0, 7, 6, _DAYS, True),
)


def _value(token: str, field: _Field, expr: str) -> int:
    upper = token.upper()
    if upper in field.names:
        return field.names[upper]
    if "#" in token or re.fullmatch(r"\d*L|\d+W|LW", upper):
        raise ConfigError(
            f"cron '{expr}': {field.name} '{token}' uses a Quartz extension (L, W, #) "
            "that Kubeflow's scheduler does not support"
        )
    if not token.isdigit():
        raise ConfigError(f"cron '{expr}': {field.name} value '{token}' is not a number or name")
    number = int(token)
    if not field.low <= number <= field.high:
        raise ConfigError(
            f"cron '{expr}': {field.name} value {number} is outside {field.low}-{field.high}"
        )
    return number


def _parse_field(text: str, field: _Field, expr: str) -> set[int] | None:
    """The values a field matches; None for `*`/`?` (unrestricted)."""
    if text in ("*", "?"):
        if text == "?" and not field.question:
            raise ConfigError(f"cron '{expr}': '?' is only allowed in day-of-month and day-of-week")
        return None
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ConfigError(f"cron '{expr}': empty list item in {field.name} '{text}'")
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ConfigError(
                    f"cron '{expr}': {field.name} step '{step_text}' must be a positive number"
                )
            step = int(step_text)
        if rng in ("*", "?"):
            low, high = field.low, field.star_high
        elif "-" in rng:
            a, _, b = rng.partition("-")
            low, high = _value(a, field, expr), _value(b, field, expr)
            if low > high:
                raise ConfigError(f"cron '{expr}': {field.name} range '{rng}' starts after it ends")
        else:
            low = _value(rng, field, expr)
            # robfig reads `A/S` as `A-max/S`; a bare `A` is the single value.
            high = field.star_high if step_text else low
        values.update(range(low, high + 1, step))
    return values


def _never_fires(dom: set[int] | None, month: set[int] | None, dow: set[int] | None) -> bool:
    if dom is None or dow is not None:
        return False  # with a weekday restriction the day matches by weekday (OR semantics)
    months = month or set(range(1, 13))
    longest = max(29 if m == 2 else calendar.monthrange(2001, m)[1] for m in months)
    return min(dom) > longest


def to_kfp_cron(expr: str) -> str:
    """`0 3 * * *` -> `0 0 3 * * *`. Raises ConfigError naming the bad field."""
    raw = " ".join(expr.split())
    if not raw:
        raise ConfigError("cron expression is empty; expected 5 fields, e.g. '0 3 * * *'")
    if raw.startswith("@"):
        macro = raw.lower()
        if macro not in MACROS:
            raise ConfigError(
                f"cron '{expr}': unknown macro; supported: {', '.join(sorted(MACROS))}"
            )
        raw = MACROS[macro]
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
    parsed = [_parse_field(text, field, expr) for text, field in zip(fields, _FIELDS, strict=True)]
    if _never_fires(parsed[2], parsed[3], parsed[4]):
        raise ConfigError(f"cron '{expr}': day-of-month never occurs in the given month(s)")
    out = list(fields)
    dow = parsed[4]
    if dow is not None and 7 in dow:
        # robfig rejects weekday 7; spell the set out with Sunday as 0.
        out[4] = ",".join(str(d) for d in sorted({0 if d == 7 else d for d in dow}))
    return "0 " + " ".join(out)
