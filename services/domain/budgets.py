"""Spend budgets in money: what a budget is, its periods, and what a request may cost. Pure.

A budget caps what a tenant, one of its environments or one API key may spend per period, in
the currency the catalog prices in (US dollars), priced exactly as billing prices (catalog
price times region multiplier: services/domain/pricing.py), on the same nano-dollar grid as
every usage record's cost (services/domain/cost_meter.py). The gateway enforces it in Redis,
in whole nano-dollars (integers: Lua's numbers are doubles, exact below 2**53, which is
$9,007,199 a period — `MAX_AMOUNT` keeps budgets below it).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, Literal

from services.domain.cost_meter import DEFAULT_UNIT, to_units
from services.domain.pricing import cost

Scope = Literal["tenant", "environment", "key"]
SCOPES: Final[tuple[Scope, ...]] = ("tenant", "environment", "key")
PeriodKind = Literal["day", "month", "days"]
"""`day` and `month` reset at UTC midnight and the first of the month; `days` every
`every_days` days from `anchor`."""

NANO: Final = DEFAULT_UNIT
MAX_AMOUNT: Final = Decimal("999999.999999999")
"""Dollars: a budget's nano-dollars must stay exact in Redis's Lua (below 2**53), with room
for the reservations on top of it."""
AMOUNT_PATTERN: Final = r"^(0|[1-9][0-9]{0,5})(\.[0-9]{1,9})?$"
"""A budget as the API takes it: a decimal string, 0 to MAX_AMOUNT, at most 9 places."""
MAX_EVERY_DAYS: Final = 366


@dataclass(frozen=True, slots=True)
class Period:
    kind: PeriodKind
    every_days: int = 1
    anchor: datetime | None = None
    """For `days`: when the first period starts (UTC)."""

    def __post_init__(self) -> None:
        if self.kind == "days":
            if self.anchor is None or self.anchor.tzinfo is None:
                raise ValueError("a period of days needs an anchor with a time zone")
            if not 1 <= self.every_days <= MAX_EVERY_DAYS:
                raise ValueError(f"every_days must be 1 to {MAX_EVERY_DAYS}")


def period_bounds(period: Period, now: datetime) -> tuple[datetime, datetime]:
    """The period holding `now`: [start, end), in UTC."""
    now = now.astimezone(UTC)
    if period.kind == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period.kind == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        return start, start + timedelta(days=days)
    assert period.anchor is not None
    length = timedelta(days=period.every_days)
    anchor = period.anchor.astimezone(UTC)
    count = (now - anchor) // length  # floor division: periods before the anchor too
    start = anchor + count * length
    return start, start + length


def nano(amount: Decimal) -> int:
    """Dollars as whole nano-dollars (the grid every record's cost is on)."""
    return to_units(amount, NANO)


def worst_case_cost(prompt_tokens: int, max_output_tokens: int, choices: int,
                    input_per_million: Decimal, output_per_million: Decimal,
                    max_multiplier: Decimal) -> Decimal:
    """What a request can cost at most before it is routed: its prompt once, its output
    budget for each choice, at the dearest region it could be served in."""
    return cost(prompt_tokens, max_output_tokens * max(1, choices), input_per_million,
                output_per_million, max_multiplier)


@dataclass(frozen=True, slots=True)
class Budget:
    scope: Scope
    scope_id: str
    amount: Decimal
    period: Period

    def __post_init__(self) -> None:
        if not Decimal(0) <= self.amount <= MAX_AMOUNT:
            raise ValueError(f"a budget is 0 to {MAX_AMOUNT} dollars")
        if self.amount != self.amount.quantize(NANO):
            raise ValueError("a budget has at most 9 decimal places")
