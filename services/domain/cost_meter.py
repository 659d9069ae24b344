"""Billing money, not tokens: the cost meter's unit, and which hours it carries. Pure: no I/O.

A tenant's invoice must equal what the platform computed, `usage_records.cost`, whatever models
and regions it used. So billing exports each tenant-hour's cost to one Stripe meter, in whole
*units* of a fixed fraction of the currency (`BILLING_COST_UNIT`, by default a nano-dollar:
the precision every record's cost already has, so nothing is rounded before Stripe's invoice),
and the Stripe price of that meter is one unit (`unit_amount_decimal`, in cents).

Shared by billing (which exports) and the admin API (which creates the price, and moves tenants
from the token prices to it), so both read the same unit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Final, Literal

Meter = Literal["input_tokens", "output_tokens", "cost"]
TOKEN_METERS: Final[tuple[Meter, ...]] = ("input_tokens", "output_tokens")
COST_METERS: Final[tuple[Meter, ...]] = ("cost",)

RECORD_PLACES: Final = 9
"""Decimal places every usage record's cost is rounded to (billing's recorder)."""
DEFAULT_UNIT: Final = Decimal("0.000000001")
COARSEST_UNIT: Final = Decimal("0.01")
STRIPE_MAX_DIGITS: Final = 15
"""Stripe refuses meter event values of more than 15 significant digits (and adds them up in
double precision, exact below 2**53)."""
STRIPE_MAX_DECIMAL_PLACES: Final = 12
"""`unit_amount_decimal` takes at most 12 decimal places (of the minor unit)."""
COST_PRICE_LOOKUP_KEY: Final = "crosslogic_cost"
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
"""`cost_from` of a tenant billed by cost from its first hour."""


def parse_unit(value: str) -> Decimal:
    """`BILLING_COST_UNIT`: a power of ten between a nano-unit and a cent of the currency
    (`0.000000001` … `0.01`). Finer than a record's cost would be a unit no record holds;
    ValueError otherwise."""
    try:
        unit = Decimal(value.strip())
    except InvalidOperation:
        raise ValueError(f"not a decimal number: {value[:40]!r}") from None
    if not unit.is_finite() or unit <= 0:
        raise ValueError("must be a positive decimal")
    exponent = unit.normalize().as_tuple()
    if exponent.digits != (1,) or not DEFAULT_UNIT <= unit <= COARSEST_UNIT:
        raise ValueError("must be a power of ten from 0.000000001 (nano) to 0.01 (cent)")
    return unit.normalize()


def to_units(cost: Decimal, unit: Decimal) -> int:
    """A cost (in the currency) as whole units. Exact when the unit is the records' own
    precision (the default); a coarser unit rounds half to even, which is monotonic, so an
    hour's units never go down when late usage comes in."""
    return int((cost / unit).to_integral_value(rounding=ROUND_HALF_EVEN))


def unit_amount_decimal(unit: Decimal) -> str:
    """The Stripe price of one unit, in cents (the currency's minor unit): `unit_amount_decimal`
    (at most 12 decimal places; a nano-dollar is 0.0000001 cents)."""
    cents = (unit * 100).normalize()
    text = format(cents, "f")
    places = len(text.partition(".")[2])
    if places > STRIPE_MAX_DECIMAL_PLACES:
        raise ValueError(f"{unit} is finer than Stripe prices can be")
    return text


def fits_stripe(value: int) -> bool:
    """Whether Stripe takes this meter event value (at most 15 significant digits)."""
    return 0 <= value < 10 ** STRIPE_MAX_DIGITS


def meters_for(hour: datetime, cost_from: datetime | None) -> tuple[Meter, ...]:
    """The meters an hour of a tenant is billed on: the token meters before its switch to the
    cost price (and for tenants never switched), the cost meter from `cost_from` on. One or the
    other, never both, so no hour is billed twice at the switch and none is missed."""
    if cost_from is not None and hour >= cost_from:
        return COST_METERS
    return TOKEN_METERS


LAST_HOUR: Final = datetime(9999, 12, 31, 23, tzinfo=UTC)


def ceil_hour(t: datetime) -> datetime:
    """The whole UTC hour at or after `t` (the last hour the calendar holds at most)."""
    t = t.astimezone(UTC)
    floor = t.replace(minute=0, second=0, microsecond=0)
    if floor == t or floor >= LAST_HOUR:
        return floor
    return floor + timedelta(hours=1)


def switch_hour(now: datetime, last_token_hour: datetime | None,
                requested: datetime | None = None) -> datetime:
    """The first hour a tenant is billed by cost. Hours already planned on the token meters
    stay token hours (their late usage too), and so does every hour that may still be
    planned on them while the switch is recorded, the current one included: the switch takes
    effect at the next hour boundary at the earliest (a meter event is then never stamped
    before the subscription item existed). A tenant that never had a token export is billed by
    cost from its first hour (EPOCH). `requested`: the operator's choice (the start of the
    next billing period, say), as the whole hour at or after it, and never earlier than the
    above."""
    now = now.astimezone(UTC)
    earliest = EPOCH if last_token_hour is None else max(
        now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1),
        last_token_hour.astimezone(UTC) + timedelta(hours=1))
    return earliest if requested is None else max(earliest, ceil_hour(requested))
