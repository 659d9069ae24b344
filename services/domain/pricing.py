"""The price of a request. Pure, in Decimal — never floats.

    cost = (prompt_tokens * input_price + completion_tokens * output_price) / 1,000,000
           * region_multiplier

Prices are per million tokens (the catalog's unit). The result is rounded once, at the end, to
COST_PLACES decimal places (nanodollars) with banker's rounding (ROUND_HALF_EVEN), so sums of
many small requests carry no systematic bias; usage_records stores exactly that value.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

COST_PLACES = 9
_QUANTUM = Decimal(1).scaleb(-COST_PLACES)
_MILLION = Decimal(1_000_000)


def cost(prompt_tokens: int, completion_tokens: int, input_price_per_million: Decimal,
         output_price_per_million: Decimal, region_multiplier: Decimal = Decimal(1)) -> Decimal:
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    if min(input_price_per_million, output_price_per_million, region_multiplier) < 0:
        raise ValueError("prices and multipliers cannot be negative")
    raw = (prompt_tokens * input_price_per_million
           + completion_tokens * output_price_per_million) / _MILLION * region_multiplier
    return raw.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def parse_multipliers(spec: str) -> dict[str, Decimal]:
    """``eu-west-1=1.10,ap-south-1=1.25`` → {region: multiplier}; ValueError names the bad
    pair."""
    out: dict[str, Decimal] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        region, sep, value = pair.partition("=")
        try:
            multiplier = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"bad region multiplier {pair!r}: expected region=number") from None
        if not sep or not region.strip() or not multiplier.is_finite() or multiplier < 0:
            raise ValueError(f"bad region multiplier {pair!r}: expected region=number >= 0")
        out[region.strip()] = multiplier
    return out
