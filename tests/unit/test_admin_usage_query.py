"""Usage queries' pure parts: parameters refused by name, which hours usage_hourly answers
for, and a report's total."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest
from multidict import MultiDict, MultiDictProxy

from services.domain.usage_queries import (
    DIMENSIONS,
    PARAMS,
    UsageQueryError,
    UsageTotal,
    money,
    parse_usage_query,
    report_of,
    usage_sql,
    usage_sum,
    whole_hours,
)

NOW = datetime(2025, 3, 10, 12, 34, 56, tzinfo=UTC)


def query(*pairs: tuple[str, str]) -> MultiDictProxy[str]:
    """What aiohttp hands a handler as request.query."""
    return MultiDictProxy(MultiDict(pairs))


@pytest.mark.parametrize(("pairs", "param"), [
    ((("tenant_id", str(uuid.uuid4())), ("tenant_id", str(uuid.uuid4()))), "tenant_id"),
    ((("model", "a"), ("model", "a")), "model"),
    ((("tenant", "x"),), "tenant"),
    ((("group_by", "tenant,planet"),), "group_by"),
    ((("region", "us-east-1"), ("region", "eu-west-1")), "region"),
    ((("region", ""),), "region"),
    ((("region", "r" * 201),), "region"),
    ((("group_by", " , "),), "group_by"),
])
def test_unknown_and_repeated_parameters_are_refused(pairs: tuple[tuple[str, str], ...],
                                                     param: str) -> None:
    with pytest.raises(UsageQueryError) as caught:
        parse_usage_query(query(*pairs), now=NOW)
    assert caught.value.param == param


def test_a_caller_can_narrow_the_parameters() -> None:
    allowed = ("start", "end", "granularity", "group_by")
    with pytest.raises(UsageQueryError) as caught:
        parse_usage_query({"environment_id": str(uuid.uuid4())}, now=NOW, allowed=allowed)
    assert caught.value.param == "environment_id"


def test_group_by_keeps_a_fixed_order() -> None:
    assert parse_usage_query({}, now=NOW).group_by == DIMENSIONS
    q = parse_usage_query(query(("group_by", "model, tenant")), now=NOW)
    assert q.group_by == ("tenant", "model")
    assert "api_key_id" not in usage_sql(q).split("FROM usage\n")[0].split("AS period")[1]


def test_whole_hours_are_inside_the_period() -> None:
    q = parse_usage_query({"start": "2025-03-09T10:15:00Z", "end": "2025-03-10T12:00:00Z",
                           "group_by": "tenant,environment,model"}, now=NOW)
    assert whole_hours(q) == (datetime(2025, 3, 9, 11, tzinfo=UTC),
                              datetime(2025, 3, 10, 12, tzinfo=UTC))
    aligned = parse_usage_query({"start": "2025-03-09T10:00:00Z", "end": "30m",
                                 "group_by": "model"}, now=NOW)
    assert whole_hours(aligned) == (datetime(2025, 3, 9, 10, tzinfo=UTC),
                                    datetime(2025, 3, 10, 12, tzinfo=UTC))


@pytest.mark.parametrize("params", [
    {"start": "2025-03-10T10:15:00Z", "end": "2025-03-10T10:45:00Z", "group_by": "model"},
    {"start": "2d"},  # the default groups by key too: usage_hourly has no key column
    {"start": "2d", "group_by": "key"},
    {"start": "2d", "group_by": "tenant", "api_key_id": str(uuid.uuid4())},
])
def test_no_whole_hours_when_the_table_cannot_answer(params: dict[str, str]) -> None:
    q = parse_usage_query(params, now=NOW)
    first, last = whole_hours(q)
    assert first == last == q.start


def test_whole_hours_are_utc_hours_whatever_the_offset_given() -> None:
    q = parse_usage_query({"start": "2025-03-09T10:15:00+05:30", "end": "1h",
                           "group_by": "tenant"}, now=NOW)
    first, last = whole_hours(q)
    assert first == datetime(2025, 3, 9, 5, tzinfo=UTC)
    assert last == datetime(2025, 3, 10, 11, tzinfo=UTC)
    assert first - q.start < timedelta(hours=1)


def test_region_is_a_dimension_and_a_filter() -> None:
    assert DIMENSIONS[-2:] == ("model", "region") and PARAMS[-2:] == ("model", "region")
    q = parse_usage_query(query(("group_by", "region,model"), ("region", "eu-west-1")),
                          now=NOW)
    assert (q.group_by, q.region) == (("model", "region"), "eu-west-1")
    sql = usage_sql(q)
    assert "period, model, region," in sql and "GROUP BY 1, model, region" in sql
    # Both halves of the query filter by it: whole hours and ragged edges alike.
    assert sql.count("($10::text IS NULL OR region = $10)") == 2
    # Not grouping by region folds the regions together.
    assert ", region," not in usage_sql(parse_usage_query({"group_by": "model"}, now=NOW)
                                        ).split("AS period")[1].split("FROM usage\n")[0]


def test_region_is_answered_from_whole_hours() -> None:
    q = parse_usage_query({"start": "2025-03-09T10:15:00Z", "end": "2025-03-10T12:00:00Z",
                           "group_by": "model,region", "region": "eu-west-1"}, now=NOW)
    assert whole_hours(q) == (datetime(2025, 3, 9, 11, tzinfo=UTC),
                              datetime(2025, 3, 10, 12, tzinfo=UTC))


def row(model: str, region: str, requests: int, prompt: int, completion: int,
        cost: str) -> UsageTotal:
    return UsageTotal(period_start=datetime(2025, 3, 10, tzinfo=UTC), model=model,
                      region=region, requests=requests, prompt_tokens=prompt,
                      completion_tokens=completion, total_tokens=prompt + completion,
                      cost=cost)


def test_the_total_is_the_exact_sum_of_the_rows() -> None:
    rows = [row("a", "us-east-1", 3, 30, 12, "0.000000001"),
            row("a", "eu-west-1", 1, 10, 4, "0.100000000"),
            row("b", "us-east-1", 2, 7, 0, "0.200000000"),
            row("b", "eu-west-1", 5, 0, 9, "123456789012345.000000000")]
    total = usage_sum(rows)
    assert (total.requests, total.prompt_tokens, total.completion_tokens,
            total.total_tokens) == (11, 47, 25, 72)
    # Decimal, not float: 0.1 + 0.2 is 0.3, and the 9th place survives a large figure.
    assert str(total.cost) == "123456789012345.300000001"
    assert total.total_tokens == sum(r.total_tokens for r in rows)
    # Past the default context's 28 digits too (a sum of sums is not bounded by numeric(24, 9)).
    huge = [row("a", "r", 1, 0, 0, "99999999999999999999999.000000001")] * 3
    assert str(usage_sum(huge).cost) == "299999999999999999999997.000000003"


def test_no_usage_is_a_zero_total() -> None:
    total = usage_sum([])
    assert (total.requests, total.prompt_tokens, total.completion_tokens, total.total_tokens,
            total.cost) == (0, 0, 0, 0, "0.000000000")


def test_small_costs_are_written_out_not_in_exponent_form() -> None:
    assert money(Decimal("3.00E-7")) == "0.000000300"
    assert money(Decimal(0)) == "0.000000000"
    assert money(Decimal("12.5")) == "12.500000000"
    assert usage_sum([row("a", "r", 1, 1, 1, "0.000000300")]).cost == "0.000000300"


def test_a_report_carries_its_rows_their_total_and_the_currency() -> None:
    q = parse_usage_query({"start": "2025-03-10T00:00:00Z", "end": "2025-03-11T00:00:00Z",
                           "group_by": "model,region"}, now=NOW)
    rows = [row("a", "us-east-1", 2, 20, 8, "0.000003600"),
            row("a", "eu-west-1", 1, 10, 4, "0.000001980")]
    body = msgspec.json.decode(msgspec.json.encode(report_of(q, rows)))
    assert body["currency"] == "usd" and body["group_by"] == ["model", "region"]
    assert body["total"] == {"requests": 3, "prompt_tokens": 30, "completion_tokens": 12,
                             "total_tokens": 42, "cost": "0.000005580"}
    assert [(r["model"], r["region"], r["cost"]) for r in body["data"]] == [
        ("a", "us-east-1", "0.000003600"), ("a", "eu-west-1", "0.000001980")]
    assert sum(Decimal(r["cost"]) for r in body["data"]) == Decimal(body["total"]["cost"])
    # A row not grouped by region leaves it out, as any other field not grouped by.
    by_model = UsageTotal(period_start=q.start, model="a", requests=1, prompt_tokens=1,
                          completion_tokens=1, total_tokens=2, cost=Decimal("0.1"))
    assert "region" not in msgspec.json.decode(msgspec.json.encode(by_model))
