"""Which usage goes to Stripe, when, and under which identifier. Pure: no I/O.

- An hour is the UTC hour ``[H, H+1h)`` of a request's `occurred_at`. It is *closed* once
  ``H + 1h + grace <= now``: usage arriving later than the grace is late usage.
- Each closed hour of each tenant is one Stripe meter event per meter, whose value is what
  the hour holds minus what was already planned for it. The meters are the hour's cost, in
  whole units of `BILLING_COST_UNIT` (services/domain/cost_meter.py), for tenants on the cost
  price from their switch on; the input and output tokens before it (and for tenants never
  switched). Never both for one hour. The first
  carries the identifier ``<tenant>:<meter>:<YYYY-MM-DDTHH>``; late usage of an hour already
  exported goes out as a correction, ``<tenant>:<meter>:<YYYY-MM-DDTHH>:<n>`` (n = 1, 2, …),
  for the difference only. Identifiers are deterministic: a resend after a crash carries the
  same one, and Stripe drops it as a duplicate.
- The meter event's timestamp is the hour's start, so usage lands in the billing period it
  happened in — while that is safe. Stripe adds usage to a period's invoice until it finalizes
  it, by default one hour after the period ends. An hour that ended more than the backdate
  window ago (BILLING_BACKDATE_WINDOW, 45 minutes: under that hour, with room for Stripe's
  asynchronous processing) may belong to a period whose invoice is final, where its usage
  would never be billed; it is stamped `now` instead, billed in the current period. That is
  late usage (corrections) and hours sent late (Stripe or billing down for a while). Stripe
  also refuses timestamps older than 35 days: such hours are stamped `now` whatever the window.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.domain.cost_meter import Meter, fits_stripe, to_units

HOUR = timedelta(hours=1)
STRIPE_MAX_AGE = timedelta(days=35)
"""Stripe accepts meter event timestamps within the past 35 calendar days…"""
STRIPE_MAX_AHEAD = timedelta(minutes=5)
"""…and up to 5 minutes in the future."""
AGE_MARGIN = timedelta(hours=1)
"""Kept from the 35 days: clock drift and the time a send can take."""
BACKDATE_WINDOW = timedelta(minutes=45)
"""How long after an hour ends its usage is still stamped with the hour's start: under
Stripe's default invoice finalization grace (1 h after a period ends)."""

METERS: tuple[Meter, ...] = ("input_tokens", "output_tokens", "cost")


def floor_hour(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("times must carry a time zone")
    t = t.astimezone(UTC)
    return t.replace(minute=0, second=0, microsecond=0)


def closed_before(now: datetime, grace: timedelta) -> datetime:
    """Hours starting before this instant are closed: ``H + 1h + grace <= now``."""
    if grace < timedelta(0):
        raise ValueError("the grace cannot be negative")
    return floor_hour(now - grace)


def is_closed(hour: datetime, now: datetime, grace: timedelta) -> bool:
    return floor_hour(hour) < closed_before(now, grace)


def identifier(tenant_id: uuid.UUID, meter: str, hour: datetime, sequence: int = 0) -> str:
    """Stripe allows 100 characters; this is at most ~70."""
    if sequence < 0:
        raise ValueError("sequence cannot be negative")
    base = f"{tenant_id}:{meter}:{floor_hour(hour):%Y-%m-%dT%H}"
    return base if sequence == 0 else f"{base}:{sequence}"


def meter_timestamp(hour: datetime, now: datetime,
                    backdate_window: timedelta = BACKDATE_WINDOW) -> int:
    """Unix seconds for the meter event of `hour`, sent at `now`: the hour's start while the
    hour ended less than `backdate_window` ago (its period's invoice is surely still open),
    else `now` (billed in the current period rather than perhaps never)."""
    start = floor_hour(hour)
    if now - (start + HOUR) > backdate_window or start < now - STRIPE_MAX_AGE + AGE_MARGIN:
        return int(now.timestamp())
    return int(min(start, now + STRIPE_MAX_AHEAD).timestamp())


@dataclass(frozen=True)
class HourDue:
    """One meter of one closed tenant hour, as the database sees it."""

    tenant_id: uuid.UUID
    hour: datetime
    meter: Meter
    total: int
    """What the hour holds now: tokens, or whole cost units (`meter_total`)."""
    planned: int
    """What is already planned, exported or given up for this hour and meter."""
    last_sequence: int | None
    """The highest sequence planned so far; None when nothing was."""
    skipped: bool
    """The hour was reported as skipped (no Stripe customer) already."""
    customer_id: str | None


@dataclass(frozen=True)
class Plan:
    tenant_id: uuid.UUID
    hour: datetime
    meter: Meter
    event_name: str
    value: int
    identifier: str
    sequence: int
    customer_id: str


@dataclass(frozen=True)
class Skip:
    tenant_id: uuid.UUID
    hour: datetime
    meter: Meter
    value: int
    identifier: str
    sequence: int
    reason: str


NO_CUSTOMER = "tenant has no Stripe customer"
TOO_LARGE = "more than the 15 significant digits Stripe takes in a meter event value"


def meter_total(meter: Meter, raw: Decimal, cost_unit: Decimal) -> int:
    """What an hour holds on a meter, from the database's sum: tokens as they are, cost (in
    the currency) as whole units."""
    return to_units(raw, cost_unit) if meter == "cost" else int(raw)


def decide(due: Iterable[HourDue], event_names: Mapping[str, str]) -> list[Plan | Skip]:
    """What to do about each meter-hour whose usage is not all planned yet: plan the
    difference (a whole number of tokens or cost units, never zero or negative), or report
    once that the tenant has no Stripe customer. Meters without an event name are not
    exported. A difference Stripe would refuse (over 15 digits) is reported as skipped, for an
    operator, rather than sent to be refused every pass."""
    out: list[Plan | Skip] = []
    for d in due:
        value = d.total - d.planned
        event_name = event_names.get(d.meter, "")
        if value <= 0 or not event_name:
            continue
        sequence = 0 if d.last_sequence is None else d.last_sequence + 1
        ident = identifier(d.tenant_id, d.meter, d.hour, sequence)
        if not d.customer_id or not fits_stripe(value):
            if not d.skipped:
                out.append(Skip(d.tenant_id, floor_hour(d.hour), d.meter, value, ident,
                                sequence, NO_CUSTOMER if not d.customer_id else TOO_LARGE))
            continue
        out.append(Plan(d.tenant_id, floor_hour(d.hour), d.meter, event_name, value, ident,
                        sequence, d.customer_id))
    return out


RESEND_HORIZON = timedelta(hours=20)
"""Stripe keeps meter event identifiers unique "within a rolling period of at least 24 hours";
this leaves 4 of them as margin (clock drift, a send in flight)."""


def must_hold(planned_at: datetime, now: datetime, horizon: timedelta, ambiguous: bool) -> bool:
    """Whether a planned meter event must no longer be sent, but held for an operator: an
    earlier attempt may have reached Stripe (`ambiguous`), and its identifier may be past
    Stripe's deduplication by now, so a resend could be counted twice. The age runs from the
    plan, which is never later than any attempt (a crashed sender's included)."""
    return ambiguous and now - planned_at >= horizon


def send_groups(plans: Iterable[Plan]) -> list[list[Plan]]:
    """Plans grouped so that each group is sent one call at a time: Stripe allows one
    concurrent meter event call per customer and meter. Groups keep hour order."""
    groups: dict[tuple[str, str], list[Plan]] = {}
    for p in sorted(plans, key=lambda p: (p.hour, p.sequence, str(p.tenant_id), p.meter)):
        groups.setdefault((p.customer_id, p.event_name), []).append(p)
    return list(groups.values())
