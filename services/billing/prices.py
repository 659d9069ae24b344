"""Model prices from the catalog, held in memory for the usage recorder. Usage is always priced
here: a `price` already on an incoming event is replaced, never believed (anyone able to
publish usage could otherwise set what a tenant pays).

The catalog is read again every `refresh_seconds`, and, for the models a batch names that the
book does not know, once per batch (`prepare`): one query for the lot, never one per record.
A model the catalog did not have is remembered as unknown for `unknown_seconds`, so usage
naming made-up models costs no query per record, nor per batch while the same names come back.
A gateway serves only models in its catalog, so an honest record's model is in the catalog
before its usage arrives; only a model created within `unknown_seconds` of a record that named
it before it existed waits that long.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from decimal import Decimal

import asyncpg
import msgspec

from schemas.events import UsagePrice, UsageRecorded
from services.domain.pricing import cost
from services.infra.db import Connection

__all__ = ["PriceBook", "UnknownModel", "to_look_up"]

_PRICES = "SELECT name, input_price_per_million, output_price_per_million FROM models"


class UnknownModel(ValueError):
    """Usage for a model the catalog does not know cannot be priced: it is parked in the dead
    letters for an operator, never recorded at a made-up price."""


def to_look_up(models: Iterable[str], known: Mapping[str, object],
               unknown_since: Mapping[str, float], now: float,
               unknown_seconds: float) -> set[str]:
    """The models to ask the catalog about: neither priced already nor found missing within
    the last `unknown_seconds`. Pure."""
    return {m for m in models if m not in known
            and now - unknown_since.get(m, float("-inf")) >= unknown_seconds}


class PriceBook:
    def __init__(self, db: asyncpg.Pool[asyncpg.Record], multipliers: dict[str, Decimal], *,
                 refresh_seconds: float = 30.0, unknown_seconds: float = 5.0,
                 max_unknown: int = 10_000) -> None:
        self.db = db
        self.multipliers = multipliers
        self.refresh_seconds = refresh_seconds
        self.unknown_seconds = unknown_seconds
        self.max_unknown = max_unknown
        self.prices: dict[str, tuple[Decimal, Decimal]] = {}
        self._unknown: dict[str, float] = {}
        """Model → when the catalog last did not have it (monotonic)."""
        self._loaded_at = float("-inf")
        self.queries = 0
        """Reads of the catalog made (the tests watch it)."""

    async def refresh(self, conn: Connection | None = None) -> None:
        """Read every price again (at start, and every `refresh_seconds`)."""
        self.queries += 1
        rows = await (conn or self.db).fetch(_PRICES)
        self.prices = {r["name"]: (r["input_price_per_million"],
                                   r["output_price_per_million"]) for r in rows}
        self._loaded_at = time.monotonic()
        self._unknown.clear()  # asked again at most once, by the next batch that names them

    async def prepare(self, models: Iterable[str], conn: Connection | None = None) -> None:
        """Make sure the book has what the catalog says of `models` (the names one batch's
        usage carries): at most one query."""
        now = time.monotonic()
        if now - self._loaded_at > self.refresh_seconds:
            await self.refresh(conn)
            return
        wanted = to_look_up(models, self.prices, self._unknown, now, self.unknown_seconds)
        if not wanted:
            return
        self.queries += 1
        rows = await (conn or self.db).fetch(_PRICES + " WHERE name = ANY($1::text[])",
                                             sorted(wanted))
        for r in rows:
            self.prices[r["name"]] = (r["input_price_per_million"],
                                      r["output_price_per_million"])
            wanted.discard(r["name"])
        if len(self._unknown) + len(wanted) > self.max_unknown:
            # A bound, not an eviction policy: a flood of made-up names costs one query per
            # batch, no more, while the memory stays small.
            self._unknown.clear()
        for model in wanted:
            self._unknown[model] = now

    def price(self, event: UsageRecorded) -> UsageRecorded:
        """The event as billing records it: with the catalog's price applied now (whatever
        price it came with). From memory: `prepare` the batch first."""
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
