"""Model prices from the catalog, held in memory for the usage recorder. Usage is always priced
here: a `price` already on an incoming event is replaced, never believed (anyone able to
publish usage could otherwise set what a tenant pays)."""

from __future__ import annotations

import time
from decimal import Decimal

import asyncpg
import msgspec

from schemas.events import UsagePrice, UsageRecorded
from services.billing.pricing import cost


class UnknownModel(ValueError):
    """Usage for a model the catalog does not know cannot be priced: it is parked in the dead
    letters for an operator, never recorded at a made-up price."""


class PriceBook:
    def __init__(self, db: asyncpg.Pool[asyncpg.Record], multipliers: dict[str, Decimal], *,
                 refresh_seconds: float = 30.0) -> None:
        self.db = db
        self.multipliers = multipliers
        self.refresh_seconds = refresh_seconds
        self.prices: dict[str, tuple[Decimal, Decimal]] = {}
        self._loaded_at = 0.0

    async def refresh(self) -> None:
        rows = await self.db.fetch(
            "SELECT name, input_price_per_million, output_price_per_million FROM models")
        self.prices = {r["name"]: (r["input_price_per_million"],
                                   r["output_price_per_million"]) for r in rows}
        self._loaded_at = time.monotonic()

    async def price(self, event: UsageRecorded) -> UsageRecorded:
        """The event as billing records it: with the catalog's price applied now (whatever
        price it came with)."""
        if event.model not in self.prices or \
                time.monotonic() - self._loaded_at > self.refresh_seconds:
            await self.refresh()
        found = self.prices.get(event.model)
        if found is None:
            raise UnknownModel(f"no price for model {event.model!r}")
        input_price, output_price = found
        multiplier = self.multipliers.get(event.region, Decimal(1))
        return msgspec.structs.replace(event, price=UsagePrice(
            input_price_per_million=input_price, output_price_per_million=output_price,
            region_multiplier=multiplier,
            cost=cost(event.prompt_tokens, event.completion_tokens, input_price, output_price,
                      multiplier)))
