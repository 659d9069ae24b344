"""Projection `usage_records`: one row per request, with the cost billing recorded."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.events import UsageRecorded
from services.core.db import Connection
from services.core.eventlog import RecordedEvent
from services.core.projections import Projection


class UsageRecordsProjection(Projection):
    name = "usage_records"
    tables = ("usage_records",)
    event_types = ("usage.recorded",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        rows = []
        for r in events:
            e = r.event
            if not isinstance(e, UsageRecorded):
                continue
            rows.append((e.request_id, e.id, e.tenant_id, e.environment_id, e.api_key_id,
                         e.model, e.endpoint, e.region, e.node_id, e.prompt_tokens,
                         e.completion_tokens, e.prompt_tokens + e.completion_tokens,
                         e.price.cost if e.price else 0, e.latency_ms,
                         e.time_to_first_token_ms, e.status, e.streamed, e.occurred_at))
        if rows:
            # The request id is the record's identity: a second event for the same request
            # (a gateway that replayed its spool under a new event id) is not billed twice.
            await conn.executemany(
                """INSERT INTO usage_records (request_id, event_id, tenant_id, environment_id,
                       api_key_id, model, endpoint, region, node_id, prompt_tokens,
                       completion_tokens, total_tokens, cost, latency_ms, ttft_ms, status,
                       streamed, occurred_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                           $16, $17, $18)
                   ON CONFLICT (request_id) DO NOTHING""", rows)
