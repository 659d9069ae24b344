"""Reading usage back: totals per hour or day, for the admin API (any tenant) and the gateway's
`GET /v1/usage` (the caller's own tenant only).

Whole UTC hours are read from `usage_hourly` (one row per tenant, environment, model, region
and hour, kept by the same statement that writes `usage_records`), the ragged edges of the
period from `usage_records`: a month of usage is a few hundred rows to add up, not one per
request. Only a question about API keys (grouped or filtered by key) needs `usage_records`
throughout, since the hourly table has no key column.

A report carries its rows and their sum (`total`), added up here from the rows themselves, so
the one figure a tenant reads for the period is exactly what its rows add up to.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import MAX_PREC, Decimal, localcontext
from typing import Annotated, Final, Literal

import asyncpg
import msgspec

from services.infra.timeparse import parse_since

Granularity = Literal["hour", "day"]
Dimension = Literal["tenant", "environment", "key", "model", "region"]
DIMENSIONS: Final[tuple[Dimension, ...]] = ("tenant", "environment", "key", "model", "region")
MAX_SPAN = timedelta(days=366)
MAX_VALUE_LENGTH = 200
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)
"""Times a period may start or end at: days and hours stay within what the clock holds."""
PARAMS: Final = ("start", "end", "granularity", "group_by", "tenant_id", "environment_id",
                 "api_key_id", "model", "region")
"""The query parameters there are; a caller that may not filter by one (the gateway's
tenants, by tenant_id) passes its own `allowed`."""

_COLUMN: Final[dict[Dimension, str]] = {"tenant": "tenant_id", "environment": "environment_id",
                                        "key": "api_key_id", "model": "model",
                                        "region": "region"}
CURRENCY: Final = "usd"
"""What every cost is in: dollars, as the models' prices are."""


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
    region: str | None = None
    group_by: tuple[Dimension, ...] = DIMENSIONS
    """What a row is per, besides its period (in DIMENSIONS' order)."""

    @property
    def needs_keys(self) -> bool:
        return "key" in self.group_by or self.api_key_id is not None


def _time(value: str, param: str, now: datetime) -> datetime:
    try:
        when = parse_since(value, now)
    except ValueError:
        raise UsageQueryError(f"'{param}' must be an ISO-8601 time or a duration like 24h or "
                              f"7d (ago), not {value[:80]!r}", param) from None
    if not EARLIEST <= when <= LATEST:
        raise UsageQueryError(f"'{param}' must be between {EARLIEST:%Y-%m-%d} and "
                              f"{LATEST:%Y-%m-%d}", param)
    return when


def _uuid(params: Mapping[str, str], name: str) -> uuid.UUID | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise UsageQueryError(f"'{name}' must be a UUID", name) from None


def _group_by(value: str) -> tuple[Dimension, ...]:
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    unknown = sorted(wanted - set(DIMENSIONS))
    if unknown or not wanted:
        raise UsageQueryError(f"'group_by' takes a comma-separated list of "
                              f"{', '.join(DIMENSIONS)}, not {value[:80]!r}", "group_by")
    return tuple(d for d in DIMENSIONS if d in wanted)


def _single(params: Mapping[str, str] | Iterable[tuple[str, str]],
            allowed: Sequence[str]) -> dict[str, str]:
    """Each parameter once and known: a typo in a filter must not silently widen the answer,
    nor a repeated one be read as either of its values. A multidict (aiohttp's
    `request.query`) yields every repeat from items()."""
    pairs = params.items() if isinstance(params, Mapping) else params
    found: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise UsageQueryError(f"Unknown query parameter '{name}' (known: "
                                  f"{', '.join(allowed)})", name)
        if name in found:
            raise UsageQueryError(f"Query parameter '{name}' is given more than once", name)
        if not value:
            # An empty filter is a mistake, not "no filter": it must not widen the answer.
            raise UsageQueryError(f"Query parameter '{name}' is empty: give a value, or leave "
                                  "it out", name)
        if "\x00" in value or len(value) > MAX_VALUE_LENGTH:
            raise UsageQueryError(f"'{name}' must be at most {MAX_VALUE_LENGTH} characters, "
                                  "without NUL", name)
        found[name] = value
    return found


def parse_usage_query(params: Mapping[str, str] | Iterable[tuple[str, str]], *,
                      now: datetime | None = None,
                      allowed: Sequence[str] = PARAMS) -> UsageQuery:
    """From query parameters: start (default 7d ago), end (default now), granularity
    (hour|day), group_by (tenant,environment,key,model,region: the default), tenant_id,
    environment_id, api_key_id, model, region. Unknown and repeated parameters are refused.
    Pure."""
    found = _single(params, allowed)
    now = now or datetime.now(UTC)
    granularity = found.get("granularity", "day")
    if granularity not in ("hour", "day"):
        raise UsageQueryError("'granularity' must be 'hour' or 'day'", "granularity")
    start = _time(found["start"], "start", now) if "start" in found else \
        now - timedelta(days=7)
    end = _time(found["end"], "end", now) if "end" in found else now
    if end <= start:
        raise UsageQueryError("'end' must be after 'start'", "end")
    if end - start > MAX_SPAN:
        raise UsageQueryError("at most 366 days at a time", "start")
    group_by = _group_by(found["group_by"]) if "group_by" in found else DIMENSIONS
    return UsageQuery(start=start, end=end, granularity=granularity,  # type: ignore[arg-type]
                      tenant_id=_uuid(found, "tenant_id"),
                      environment_id=_uuid(found, "environment_id"),
                      api_key_id=_uuid(found, "api_key_id"), model=found.get("model"),
                      region=found.get("region"), group_by=group_by)


Money = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9]+\.[0-9]{9}$",
    description="US dollars, a decimal string with 9 places, never in exponent form")]


def money(amount: Decimal) -> str:
    """A cost as the API shows it: 9 places, fixed-point (`str()` of a Decimal below a
    millionth writes `3.00E-7`). Pure."""
    with localcontext() as exact:
        exact.prec = MAX_PREC  # quantize refuses a result longer than the context's digits
        return f"{amount.quantize(NINE_PLACES):f}"


NINE_PLACES: Final = Decimal("0.000000001")


class UsageTotal(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Requests and tokens of one period and group; cost as a decimal string (dollars,
    9 places). A field the query did not group by is left out."""

    period_start: datetime
    tenant_id: uuid.UUID | None = None
    environment_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    model: str | None = None
    region: str | None = None
    """Where the request was served: its node's region (the caller's environment's when no
    node answered)."""
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Money


class UsageSum(msgspec.Struct, kw_only=True, frozen=True):
    """The whole period's usage: the sum of the report's rows."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Money


class UsageReport(msgspec.Struct, kw_only=True, frozen=True):
    object: str = "list"
    granularity: str
    group_by: list[str]
    start: datetime
    end: datetime
    currency: Literal["usd"] = CURRENCY
    """What `cost` is in, in the rows and the total."""
    total: UsageSum
    data: list[UsageTotal]


def usage_sum(rows: Iterable[UsageTotal]) -> UsageSum:
    """The rows added up. Exactly: costs are Decimals, added without the context's rounding
    (28 digits by default), so the total is what the rows add up to however large. Pure."""
    requests = prompt = completion = 0
    cost = Decimal(0)
    with localcontext() as exact:
        exact.prec = MAX_PREC
        for r in rows:
            requests += r.requests
            prompt += r.prompt_tokens
            completion += r.completion_tokens
            cost += Decimal(r.cost)
        return UsageSum(requests=requests, prompt_tokens=prompt, completion_tokens=completion,
                        total_tokens=prompt + completion, cost=money(cost))


def report_of(q: UsageQuery, rows: list[UsageTotal]) -> UsageReport:
    """The report of `q` whose rows are `rows`, with their total. Pure."""
    return UsageReport(granularity=q.granularity, group_by=list(q.group_by), start=q.start,
                       end=q.end, total=usage_sum(rows), data=rows)


async def usage_report(db: asyncpg.Pool[asyncpg.Record], q: UsageQuery) -> UsageReport:
    return report_of(q, await usage_totals(db, q))


def _hour_ceil(t: datetime) -> datetime:
    floor = t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return floor if floor == t else floor + timedelta(hours=1)


def whole_hours(q: UsageQuery) -> tuple[datetime, datetime]:
    """The whole UTC hours inside [start, end) that `usage_hourly` answers for (an empty
    range when the query is about keys, or spans no whole hour). Pure."""
    first = _hour_ceil(q.start)
    last = q.end.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if q.needs_keys or last <= first:
        return q.start, q.start
    return first, last


def usage_sql(q: UsageQuery) -> str:
    dims = [_COLUMN[d] for d in q.group_by]
    select = "".join(f", {c}" for c in dims)
    group = ", ".join(["1", *dims])
    # $1 granularity, $2 start, $3 end, $4 first whole hour, $5 end of whole hours,
    # $6 tenant, $7 environment, $8 key, $9 model, $10 region
    return f"""
        WITH usage AS (
            SELECT hour AS at, tenant_id, environment_id, NULL::uuid AS api_key_id, model,
                   region, requests, prompt_tokens, completion_tokens, cost
            FROM usage_hourly
            WHERE hour >= $4 AND hour < $5
              AND ($6::uuid IS NULL OR tenant_id = $6)
              AND ($7::uuid IS NULL OR environment_id = $7)
              AND ($9::text IS NULL OR model = $9)
              AND ($10::text IS NULL OR region = $10)
            UNION ALL
            SELECT occurred_at, tenant_id, environment_id, api_key_id, model, region, 1,
                   prompt_tokens, completion_tokens, cost
            FROM usage_records
            WHERE occurred_at >= $2 AND occurred_at < $3
              AND NOT (occurred_at >= $4 AND occurred_at < $5)
              AND ($6::uuid IS NULL OR tenant_id = $6)
              AND ($7::uuid IS NULL OR environment_id = $7)
              AND ($8::uuid IS NULL OR api_key_id = $8)
              AND ($9::text IS NULL OR model = $9)
              AND ($10::text IS NULL OR region = $10)
        )
        SELECT date_trunc($1, at, 'UTC') AS period{select}, sum(requests)::bigint AS requests,
               sum(prompt_tokens)::bigint AS prompt_tokens,
               sum(completion_tokens)::bigint AS completion_tokens, sum(cost) AS cost
        FROM usage
        GROUP BY {group}
        ORDER BY {group}"""


async def usage_totals(db: asyncpg.Pool[asyncpg.Record], q: UsageQuery) -> list[UsageTotal]:
    """Totals per period and group, oldest period first."""
    first, last = whole_hours(q)
    rows = await db.fetch(usage_sql(q), q.granularity, q.start, q.end, first, last,
                          q.tenant_id, q.environment_id, q.api_key_id, q.model, q.region)
    return [UsageTotal(period_start=r["period"],
                       **{_COLUMN[d]: r[_COLUMN[d]] for d in q.group_by},
                       requests=r["requests"], prompt_tokens=r["prompt_tokens"],
                       completion_tokens=r["completion_tokens"],
                       total_tokens=r["prompt_tokens"] + r["completion_tokens"],
                       cost=money(r["cost"])) for r in rows]
