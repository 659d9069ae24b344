"""Reading usage back: totals per hour or day from `usage_records`, for the admin API (any
tenant) and the gateway's `GET /v1/usage` (the caller's own tenant only)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

import asyncpg
import msgspec

from services.core.timeparse import parse_since

Granularity = Literal["hour", "day"]
MAX_SPAN = timedelta(days=366)


class UsageQueryError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class UsageQuery:
    start: datetime
    end: datetime
    granularity: Granularity = "day"
    tenant_id: uuid.UUID | None = None
    environment_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    model: str | None = None


def _time(value: str, param: str, now: datetime) -> datetime:
    try:
        return parse_since(value, now)
    except ValueError:
        raise UsageQueryError(f"'{param}' must be an ISO-8601 time or a duration like 24h or "
                              f"7d (ago), not {value!r}", param) from None


def _uuid(params: Mapping[str, str], name: str) -> uuid.UUID | None:
    value = params.get(name)
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise UsageQueryError(f"'{name}' must be a UUID", name) from None


def parse_usage_query(params: Mapping[str, str], *, now: datetime | None = None) -> UsageQuery:
    """From query parameters: start (default 7d ago), end (default now), granularity
    (hour|day), tenant_id, environment_id, api_key_id, model. Pure."""
    now = now or datetime.now(UTC)
    granularity = params.get("granularity", "day")
    if granularity not in ("hour", "day"):
        raise UsageQueryError("'granularity' must be 'hour' or 'day'", "granularity")
    start = _time(params["start"], "start", now) if params.get("start") else \
        now - timedelta(days=7)
    end = _time(params["end"], "end", now) if params.get("end") else now
    if end <= start:
        raise UsageQueryError("'end' must be after 'start'", "end")
    if end - start > MAX_SPAN:
        raise UsageQueryError("at most 366 days at a time", "start")
    return UsageQuery(start=start, end=end, granularity=granularity,  # type: ignore[arg-type]
                      tenant_id=_uuid(params, "tenant_id"),
                      environment_id=_uuid(params, "environment_id"),
                      api_key_id=_uuid(params, "api_key_id"), model=params.get("model") or None)


class UsageTotal(msgspec.Struct, kw_only=True, frozen=True):
    """Requests and tokens of one period, environment, key and model; cost as a decimal
    string (dollars, 9 places)."""

    period_start: datetime
    tenant_id: uuid.UUID
    environment_id: uuid.UUID
    api_key_id: uuid.UUID
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Decimal


class UsageReport(msgspec.Struct, kw_only=True, frozen=True):
    object: str = "list"
    granularity: str
    start: datetime
    end: datetime
    data: list[UsageTotal]


async def usage_report(db: asyncpg.Pool[asyncpg.Record], q: UsageQuery) -> UsageReport:
    return UsageReport(granularity=q.granularity, start=q.start, end=q.end,
                       data=await usage_totals(db, q))


async def usage_totals(db: asyncpg.Pool[asyncpg.Record], q: UsageQuery) -> list[UsageTotal]:
    """Totals per period, environment, key and model, oldest period first."""
    rows = await db.fetch(
        """SELECT date_trunc($1, occurred_at, 'UTC') AS period, tenant_id, environment_id,
                  api_key_id, model, count(*) AS requests,
                  sum(prompt_tokens) AS prompt_tokens,
                  sum(completion_tokens) AS completion_tokens,
                  sum(total_tokens) AS total_tokens, sum(cost) AS cost
           FROM usage_records
           WHERE occurred_at >= $2 AND occurred_at < $3
             AND ($4::uuid IS NULL OR tenant_id = $4)
             AND ($5::uuid IS NULL OR environment_id = $5)
             AND ($6::uuid IS NULL OR api_key_id = $6)
             AND ($7::text IS NULL OR model = $7)
           GROUP BY 1, 2, 3, 4, 5
           ORDER BY 1, 2, 3, 4, 5""",
        q.granularity, q.start, q.end, q.tenant_id, q.environment_id, q.api_key_id, q.model)
    return [UsageTotal(period_start=r["period"], tenant_id=r["tenant_id"],
                       environment_id=r["environment_id"], api_key_id=r["api_key_id"],
                       model=r["model"], requests=r["requests"],
                       prompt_tokens=r["prompt_tokens"],
                       completion_tokens=r["completion_tokens"],
                       total_tokens=r["total_tokens"], cost=r["cost"]) for r in rows]
