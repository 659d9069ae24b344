"""The models tenants may call, from the catalog's `models` table, held in memory.

Loaded at start, reloaded when a model.* event arrives and every `refresh_seconds` as a
fallback; the hot path only reads the dict."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import msgspec
import structlog

from schemas.events import Event

log = structlog.get_logger("models")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int
    created: int
    input_price: Decimal = Decimal(0)
    """Dollars per million prompt tokens (the catalog's, as billing prices)."""
    output_price: Decimal = Decimal(0)


class ModelCatalog:
    def __init__(self, db: asyncpg.Pool[asyncpg.Record], *, refresh_seconds: float = 30.0
                 ) -> None:
        self.db = db
        self.refresh_seconds = refresh_seconds
        self.models: dict[str, ModelInfo] = {}
        self.list_body = b'{"object":"list","data":[]}'
        self._loaded_at = 0.0

    def get(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    def context_length(self, name: str) -> int | None:
        """The model's context length in tokens; None for a model not in the catalog."""
        model = self.models.get(name)
        return model.context_length if model is not None else None

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at > self.refresh_seconds

    async def refresh(self) -> None:
        rows = await self.db.fetch(
            "SELECT name, context_length, created_at, input_price_per_million, "
            "output_price_per_million FROM models WHERE status = 'active' ORDER BY name")
        self.models = {r["name"]: ModelInfo(r["name"], r["context_length"],
                                            int(r["created_at"].timestamp()),
                                            r["input_price_per_million"],
                                            r["output_price_per_million"]) for r in rows}
        # OpenAI's list shape, encoded once per change rather than per request.
        self.list_body = msgspec.json.encode({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "crosslogic"}
            for m in self.models.values()]})
        self._loaded_at = time.monotonic()

    async def on_event(self, event: Event) -> None:
        if event.type.startswith("model."):
            await self.refresh()
