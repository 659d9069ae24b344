"""What to do after an attempt: retry when, pace the endpoint how, give up, disable. Pure.

- 2xx: delivered. The endpoint's failure clock stops.
- 429: not a failure (the endpoint is alive and asking us to slow down): the same attempt is
  made again after `Retry-After` (or Discord's `retry_after`), capped; the whole endpoint
  waits that long too. It does not move the delivery along its retry schedule.
- 404 / 410: the endpoint is gone (a deleted Discord webhook must not be called again): the
  delivery fails and the endpoint is disabled at once.
- Anything else (5xx, other 4xx, timeouts, refused connections): a failure. The next attempt
  follows the schedule; past its end the delivery has failed (`notification.delivery_failed`).
  An endpoint failing without a single success for `disable_after` is disabled.
"""

from __future__ import annotations

import email.utils
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    RATE_LIMITED = "rate_limited"
    FAILED = "failed"
    GONE = "gone"
    REFUSED = "refused"
    """Never sent: the target is not allowed, or the notifier cannot send that kind."""


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt gave, whatever the transport."""

    status_code: int | None
    latency_ms: float
    excerpt: str = ""
    error: str = ""
    retry_after: float | None = None
    """Seconds the endpoint asked us to wait (a 429)."""
    pause: float | None = None
    """Seconds until the endpoint's own rate-limit bucket refills (Discord's
    X-RateLimit-Reset-After when X-RateLimit-Remaining is 0)."""
    refused: bool = False
    permanent: bool = False
    """A non-HTTP answer meaning "never again" (an SMTP server refusing the mailbox)."""
    delivered: bool = False
    """A non-HTTP success (the SMTP server took the message; its code is 250)."""


def classify(result: AttemptResult) -> Outcome:
    if result.refused:
        return Outcome.REFUSED
    if result.delivered:
        return Outcome.DELIVERED
    code = result.status_code
    if result.permanent or code in (404, 410):
        return Outcome.GONE
    if code is None:
        return Outcome.FAILED
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if code == 429:
        return Outcome.RATE_LIMITED
    return Outcome.FAILED


@dataclass(frozen=True)
class Schedule:
    """`delays[0]` is the wait before the first attempt; `delays[n]` the wait after the n-th
    failure. len(delays) attempts in all."""

    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError("a schedule needs at least one delay, none negative")

    @property
    def first(self) -> float:
        return self.delays[0]

    def after_failures(self, failures: int) -> float | None:
        """The wait before the next attempt after `failures` failures; None: exhausted."""
        return self.delays[failures] if failures < len(self.delays) else None


@dataclass(frozen=True)
class Rules:
    schedule: Schedule
    min_interval: float
    """Seconds between two requests to this endpoint."""
    disable_after: float
    max_retry_after: float


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    status: str
    """pending, delivered or failed."""
    failures: int
    next_attempt_in: float | None
    """Seconds from now; None unless the delivery stays pending."""
    next_send_in: float
    """Seconds before this endpoint may be sent anything again."""
    failing_since: datetime | None
    disable_reason: str | None = None
    exhausted: bool = False
    """The schedule ran out: report notification.delivery_failed."""


def decide(result: AttemptResult, *, failures: int, failing_since: datetime | None,
           now: datetime, rules: Rules) -> Decision:
    """The delivery's and the endpoint's next state after `result`. `failures`: failed
    attempts before this one; `failing_since`: the endpoint's failure clock."""
    outcome = classify(result)
    pace = max(rules.min_interval, result.pause or 0.0)
    if outcome is Outcome.DELIVERED:
        return Decision(outcome, "delivered", failures, None, pace, None)
    if outcome is Outcome.RATE_LIMITED:
        wait = result.retry_after if result.retry_after is not None else max(pace, 1.0)
        wait = min(max(wait, 0.0), rules.max_retry_after)
        return Decision(outcome, "pending", failures, wait, max(wait, pace), failing_since)
    since = failing_since or now
    if outcome is Outcome.GONE:
        reason = (f"the endpoint answered {result.status_code}: it is gone"
                  if result.status_code is not None else f"the endpoint refused for good: "
                                                         f"{result.error}")
        return Decision(outcome, "failed", failures + 1, None, pace, since, reason[:500])
    failed = failures + 1
    if now - since >= timedelta(seconds=rules.disable_after):
        reason = (f"failing without a success since {since.isoformat(timespec='seconds')} "
                  f"({(now - since).total_seconds():.0f} s)")
        return Decision(outcome, "failed", failed, None, pace, since, reason)
    delay = rules.schedule.after_failures(failed)
    if delay is None:
        return Decision(outcome, "failed", failed, None, pace, since, exhausted=True)
    return Decision(outcome, "pending", failed, delay, pace, since)


# --------------------------------------------------------------------------- reading answers


def retry_after_of(headers: Mapping[str, str], body: bytes, now: datetime) -> float | None:
    """Seconds to wait from a 429: Discord's JSON `retry_after` (seconds, fractional) first,
    it is more precise than its header; else `Retry-After`, in seconds or an HTTP date."""
    if body[:1] == b"{":
        try:
            found = json.loads(body).get("retry_after")
        except (ValueError, AttributeError):
            found = None
        if isinstance(found, int | float) and not isinstance(found, bool) and found >= 0:
            return float(found)
    value = _header(headers, "Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def bucket_pause(headers: Mapping[str, str]) -> float | None:
    """Discord tells how many requests are left in the bucket: none left means wait until it
    resets, before the next one (so the next one is not a 429)."""
    remaining = _header(headers, "X-RateLimit-Remaining")
    reset_after = _header(headers, "X-RateLimit-Reset-After")
    if remaining is None or reset_after is None:
        return None
    try:
        if int(float(remaining)) > 0:
            return None
        return max(0.0, float(reset_after))
    except ValueError:
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None
