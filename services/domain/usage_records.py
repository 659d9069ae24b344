"""Projection `usage_records`: one row per request, with the cost billing recorded, and the
same usage per tenant, environment, model, region and UTC hour (`usage_hourly`).

Both tables change in one statement: usage_hourly adds up only the rows usage_records actually
inserted, so the event id stays the identity of a request's usage everywhere — a redelivery,
a gateway's retried publish or spool replay (both keep the event id) or a log replay adds
nothing to either. Not the request id: that is the caller's X-Request-ID when it sent one, and
a client may reuse it, or two tenants pick the same. `crosslogic projections rebuild
usage_records` rebuilds both.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter

from schemas.events import UsageRecorded
from services.infra.db import Connection
from services.infra.log_records import RecordedEvent
from services.infra.projections import Projection

_ZERO = Decimal(0)

# unnest() of parallel arrays: one round trip per batch, however large.
_INSERT = """
WITH fresh AS (
    INSERT INTO usage_records (request_id, event_id, tenant_id, environment_id, api_key_id,
        model, endpoint, region, node_id, prompt_tokens, completion_tokens, total_tokens, cost,
        latency_ms, ttft_ms, status, streamed, occurred_at)
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[],
        $6::text[], $7::text[], $8::text[], $9::uuid[], $10::int[], $11::int[], $12::int[],
        $13::numeric[], $14::float8[], $15::float8[], $16::int[], $17::bool[],
        $18::timestamptz[])
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, tenant_id, environment_id, model, region, occurred_at, prompt_tokens,
              completion_tokens, cost
), hourly AS (
    INSERT INTO usage_hourly AS h (tenant_id, environment_id, model, region, hour, requests,
        prompt_tokens, completion_tokens, cost, updated_at, last_position)
    SELECT f.tenant_id, f.environment_id, f.model, f.region,
           date_trunc('hour', f.occurred_at, 'UTC'), count(*), sum(f.prompt_tokens),
           sum(f.completion_tokens), sum(f.cost), max(f.occurred_at), max(e.position)
    FROM fresh f JOIN unnest($2::uuid[], $19::bigint[]) AS e (event_id, position)
         USING (event_id)
    GROUP BY 1, 2, 3, 4, 5
    -- updated_at is the hour's latest usage and last_position its latest event, from the
    -- events (not the clock), so a rebuild from the log gives back the same table.
    ON CONFLICT (tenant_id, hour, environment_id, model, region) DO UPDATE SET
        requests = h.requests + EXCLUDED.requests,
        prompt_tokens = h.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = h.completion_tokens + EXCLUDED.completion_tokens,
        cost = h.cost + EXCLUDED.cost,
        updated_at = greatest(h.updated_at, EXCLUDED.updated_at),
        last_position = greatest(h.last_position, EXCLUDED.last_position)
)
SELECT tenant_id, model, count(*) AS records,
       sum(prompt_tokens + completion_tokens) AS tokens
FROM fresh GROUP BY 1, 2
"""


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.records = Counter("usage_records_created_total",
                               "Usage records created (one per request, duplicates excluded)",
                               registry=registry)
        # The gateway has a counter of the same name in its own registry: this one counts
        # what billing recorded, so the two can be compared.
        self.tokens = Counter("tokens_processed_total",
                              "Tokens recorded by billing (prompt + completion)",
                              ["model", "tenant_id"], registry=registry)


class UsageRecordsProjection(Projection):
    name = "usage_records"
    tables = ("usage_records", "usage_hourly")
    event_types = ("usage.recorded",)

    def __init__(self, metrics: UsageMetrics | None = None) -> None:
        self.metrics = metrics

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        cols: list[list[object]] = [[] for _ in range(19)]
        for r in events:
            e = r.event
            if not isinstance(e, UsageRecorded):
                continue
            row = (e.request_id, e.id, e.tenant_id, e.environment_id, e.api_key_id, e.model,
                   e.endpoint, e.region, e.node_id, e.prompt_tokens, e.completion_tokens,
                   e.prompt_tokens + e.completion_tokens, e.price.cost if e.price else _ZERO,
                   e.latency_ms, e.time_to_first_token_ms, e.status, e.streamed, e.occurred_at,
                   r.position)
            for col, value in zip(cols, row, strict=True):
                col.append(value)
        if not cols[0]:
            return
        created = await conn.fetch(_INSERT, *cols)
        if self.metrics is not None:
            for c in created:
                self.metrics.records.inc(c["records"])
                self.metrics.tokens.labels(c["model"], str(c["tenant_id"])).inc(c["tokens"])
