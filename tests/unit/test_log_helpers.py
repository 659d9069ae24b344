"""Pure pieces of the event log and the CLI: filters, globs, time parsing, line formats."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from services.cli.tail import format_json, format_line, parse_since
from services.infra.log_records import EventFilter, LogPosition, RecordedEvent, glob_to_like
from services.infra.migrate import load_migrations
from tests.helpers import tenant_created


def recorded(position: int = 7, type_: str = "tenant.created", stream: str = "tenant:1",
             origin: str = "log") -> RecordedEvent:
    t = tenant_created("acme")
    return RecordedEvent(position=position, transaction_id=100, event_id=t.id, stream=stream,
                         stream_version=1, type=type_,
                         raw_data=f'{{"tenant_id": "{t.tenant_id}", "name": "acme"}}',
                         raw_metadata="{}", occurred_at=t.occurred_at,
                         recorded_at=datetime(2026, 11, 26, 5, 0, 1, 234000, tzinfo=UTC),
                         origin=origin)


def test_glob_to_like() -> None:
    assert glob_to_like("node.*") == "node.%"
    assert glob_to_like("a?c") == "a_c"
    assert glob_to_like("100%_x\\") == "100\\%\\_x\\\\"


def test_filter_matches() -> None:
    e = recorded()
    assert EventFilter().matches(e)
    assert EventFilter(types=("tenant.*",)).matches(e)
    assert not EventFilter(types=("node.*",)).matches(e)
    assert EventFilter(types=("node.*", "tenant.created")).matches(e)
    assert EventFilter(stream="tenant:*").matches(e)
    assert not EventFilter(stream="tenant:2").matches(e)
    assert not EventFilter(origin="bus").matches(e)
    assert EventFilter(min_position=7).matches(e) and not EventFilter(min_position=8).matches(e)
    assert not EventFilter(since=datetime(2027, 1, 1, tzinfo=UTC)).matches(e)


def test_log_positions_order_by_transaction_first() -> None:
    assert LogPosition(5, 100) < LogPosition(6, 1)
    assert sorted([LogPosition(6, 1), LogPosition(5, 100), LogPosition(5, 2)]) == \
        [LogPosition(5, 2), LogPosition(5, 100), LogPosition(6, 1)]
    assert str(LogPosition(5, 100)) == "5:100"


def test_recorded_event_decodes_lazily_to_the_typed_event() -> None:
    e = recorded()
    assert e.event.type == "tenant.created"
    assert msgspec.json.decode(e.wire())["type"] == "tenant.created"
    assert e.data["name"] == "acme"
    empty = recorded()
    empty.raw_data = "{}"
    assert msgspec.json.decode(empty.wire())["metadata"] == {}


def test_parse_since() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1.5h", now) == now - timedelta(hours=1.5)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("30s", now) == now - timedelta(seconds=30)
    assert parse_since("2026-11-25T10:00:00", now) == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert parse_since("2026-11-25T10:00:00+01:00", now).utcoffset() == timedelta(hours=1)
    with pytest.raises(ValueError, match="duration"):
        parse_since("10 parsecs", now)


def test_line_formats() -> None:
    e = recorded()
    line = format_line(e)
    assert line.startswith("2026-11-26T05:00:01.234Z  #7 ")
    assert "tenant.created" in line and "tenant:1" in line and '"name":"acme"' in line
    record = msgspec.json.decode(format_json(e))
    assert record["position"] == 7 and record["origin"] == "log"
    assert record["event"]["type"] == "tenant.created"
    assert uuid.UUID(record["event"]["id"]) == e.event_id


def test_project_migrations_are_numbered_in_order() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))
