"""Times as operators type them: ``10m``, ``2h``, ``7d`` (ago) or an ISO-8601 time.

Both are bounded, so no value can overflow the clock: a duration has at most 9 digits of
seconds, 7 of minutes, 6 of hours or 5 of days (about 31, 19, 114 and 273 years; up to 6
decimals), and a time must be representable in UTC (years 1 to 9999). `DURATION_PATTERN` is
the rule, as the admin API's OpenAPI document states it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["DURATION_PATTERN", "parse_since"]

DURATION_PATTERN = (r"^(?:[0-9]{1,9}(?:\.[0-9]{1,6})?s|[0-9]{1,7}(?:\.[0-9]{1,6})?m"
                    r"|[0-9]{1,6}(?:\.[0-9]{1,6})?h|[0-9]{1,5}(?:\.[0-9]{1,6})?d)$")
_DURATION = re.compile(DURATION_PATTERN)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``10m`` / ``2h`` / ``7d`` ago, or an ISO-8601 time (UTC when it has no zone).
    ValueError for anything else, a duration past the bounds included."""
    now = now or datetime.now(UTC)
    text = value.strip()
    if _DURATION.match(text):
        return now - timedelta(**{_UNITS[text[-1]]: float(text[:-1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since wants a duration like 10m, 2h, 7d or an ISO time, "
                         f"not {value[:80]!r}") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        when.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value[:80]!r} is out of range (years 1 to 9999 in UTC)") from None
    return when
