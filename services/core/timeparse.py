"""Times as operators type them: ``10m``, ``2h``, ``7d`` (ago) or an ISO-8601 time."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``10m`` / ``2h`` / ``7d`` ago, or an ISO-8601 time (UTC when it has no zone)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since wants a duration like 10m, 2h, 7d or an ISO time, "
                         f"not {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
