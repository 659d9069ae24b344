"""Usage queries' pure parts: parameters refused by name, and which hours usage_hourly
answers for."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from multidict import MultiDict, MultiDictProxy

from services.core.usage_queries import (
    DIMENSIONS,
    UsageQueryError,
    parse_usage_query,
    usage_sql,
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
    ((("group_by", "tenant,region"),), "group_by"),
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
