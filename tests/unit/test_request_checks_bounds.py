"""The bounded values every request passes through (issue 20): text without NUL, integers
within their column, durations and times the clock can hold, no empty query value, and each
query value kind's check agreeing with the JSON Schema the OpenAPI document states."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from services.admin.bodies import DeploymentCreate, ModelCreate, TenantCreate
from services.admin.routes.subscriptions import (
    EmailSubscriptionCreate,
    GenericSubscriptionCreate,
    NotificationSubscriptionCreate,
)
from services.domain.catalog.bodies import KeyCreate, StatusChange
from services.domain.usage_queries import UsageQueryError, parse_usage_query
from services.infra.request_checks import (
    CURSOR_PATTERN,
    INT64_MAX,
    NO_NUL,
    POSITION_PATTERN,
    WHITE_SPACE,
    WHITE_SPACE_CLASS,
    Choice,
    FieldError,
    Integer,
    QueryParam,
    Text,
    TimeOrAgo,
    Uuid,
    check_future,
    check_query,
    check_text,
    decode_body,
    decode_cursor,
    decode_position,
    parse_event_query,
    parse_int,
    parse_page_query,
    parse_time,
)
from services.infra.timeparse import DURATION_PATTERN, parse_since

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def refused(call: Any, param: str | None = None) -> str:
    with pytest.raises(FieldError) as info:
        call()
    if param is not None:
        assert info.value.param == param
    return info.value.message


# --------------------------------------------------------------------------- text


def test_text_refuses_nul_empty_and_too_long() -> None:
    assert check_text("abc", "model", max_length=3) == "abc"
    assert "NUL" in refused(lambda: check_text("a\x00b", "model", max_length=10), "model")
    assert "empty" in refused(lambda: check_text("", "model", max_length=10), "model")
    assert "longer" in refused(lambda: check_text("abcd", "model", max_length=3), "model")
    assert refused(lambda: check_text("x y", "type", max_length=9, pattern=r"^\S+$"), "type")


@pytest.mark.parametrize(("type_", "body", "param"), [
    (TenantCreate, b'{"name": "a\\u0000b"}', "name"),
    (TenantCreate, b'{"name": "a", "email": "a\\u0000@b.c"}', "email"),
    (StatusChange, b'{"reason": "\\u0000"}', "reason"),
    (KeyCreate, b'{"name": "\\u0000"}', "name"),
    (DeploymentCreate, b'{"model": "\\u0000", "regions": ["r"], "gpu_type": "g", '
                       b'"spot": true, "min_nodes": 0, "max_nodes": 1}', "model"),
])
def test_bodies_refuse_nul_naming_the_field(type_: type, body: bytes, param: str) -> None:
    message = refused(lambda: decode_body(body, type_), param)
    assert "NUL" in message or "regex" in message


def test_a_nul_free_pattern_is_the_documents_too() -> None:
    assert re.search(NO_NUL, "any text, even\nlines") and not re.search(NO_NUL, "a\x00")
    schema = msgspec.json.schema(TenantCreate)["$defs"]["TenantCreate"]
    assert schema["properties"]["name"]["pattern"] == NO_NUL


# --------------------------------------------------------------------------- integers


@pytest.mark.parametrize("value", ["", "1.0", "1e3", "+1", "1_000", " 1", "0x10", "\u0661"])
def test_integers_are_digits_only(value: str) -> None:
    refused(lambda: parse_int(value, "from", minimum=0, maximum=INT64_MAX), "from")


def test_integers_stay_within_their_column() -> None:
    assert parse_int(str(INT64_MAX), "from", minimum=0, maximum=INT64_MAX) == INT64_MAX
    assert parse_int("-0", "x", minimum=0, maximum=1) == 0
    for value in (str(INT64_MAX + 1), "9" * 20, "-1"):
        assert "between" in refused(
            lambda v=value: parse_int(v, "from", minimum=0, maximum=INT64_MAX), "from")
    refused(lambda: parse_int("9" * 21, "from", minimum=0, maximum=INT64_MAX), "from")


def test_whole_numbers_written_as_floats_are_refused_in_bodies() -> None:
    body = (b'{"model": "m", "regions": ["r"], "gpu_type": "g", "spot": true, '
            b'"min_nodes": 1882.0, "max_nodes": 1900}')
    assert "int" in refused(lambda: decode_body(body, DeploymentCreate), "min_nodes")


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize(("text", "ago"), [
    ("30s", timedelta(seconds=30)), ("10m", timedelta(minutes=10)), ("1.5h", timedelta(hours=1.5)),
    ("7d", timedelta(days=7)), ("999999999s", timedelta(seconds=999_999_999)),
    ("9999999m", timedelta(minutes=9_999_999)), ("999999h", timedelta(hours=999_999)),
    ("99999d", timedelta(days=99_999)),
])
def test_durations_within_bounds(text: str, ago: timedelta) -> None:
    assert re.search(DURATION_PATTERN, text)
    assert parse_time(text, "since", NOW) == NOW - ago


@pytest.mark.parametrize("text", [
    "99999999999d", "1000000d", "10000000h", "1e400d", "inf d", "1.1234567h", "-5m", "5 m",
    "5", "d", "", " 5m", "0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00",
    "a\x00b", "2026-01-01T00:00:00Z" + " " * 60,
])
def test_durations_and_times_out_of_bounds_are_refused(text: str) -> None:
    assert "ISO-8601" in refused(lambda: parse_time(text, "since", NOW), "since")


def test_times_are_read_as_given() -> None:
    assert parse_time("2026-01-01T00:00:00Z", "since", NOW) == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("2026-01-01T00:00", "since", NOW) == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("0001-01-01T00:00:00Z", "since", NOW).year == 1
    # the operator's CLI may still pad its value
    assert parse_since(" 10m ", NOW) == NOW - timedelta(minutes=10)


def test_a_future_time_must_be_representable() -> None:
    far = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    assert "range" in refused(lambda: check_future(far, "expires_at", NOW), "expires_at")
    assert "future" in refused(lambda: check_future(NOW, "expires_at", NOW), "expires_at")
    soon = NOW + timedelta(seconds=1)
    assert check_future(soon, "expires_at", NOW) == soon


# --------------------------------------------------------------------------- query strings


PARAMS = (QueryParam("limit", "", Integer(1, 200, 50)),
          QueryParam("cursor", "", Text(max_length=22, pattern=CURSOR_PATTERN)),
          QueryParam("status", "", Choice(("a", "b"))),
          QueryParam("tenant_id", "", Uuid()),
          QueryParam("since", "", TimeOrAgo()),
          QueryParam("type", "", Text(), repeatable=True))


def test_check_query_takes_what_is_declared() -> None:
    check_query([("limit", "200"), ("cursor", "A" * 22), ("status", "b"),
                 ("tenant_id", "01a243bc-1017-7278-98b0-c9a66bf9e335"), ("since", "7d"),
                 ("type", "x"), ("type", "y")], PARAMS)
    check_query([], PARAMS)


@pytest.mark.parametrize(("pairs", "param", "says"), [
    ([("bogus", "1")], "bogus", "Unknown query parameter"),
    ([("limit", "1"), ("limit", "2")], "limit", "more than once"),
    ([("limit", "")], "limit", "empty"),
    ([("tenant_id", "")], "tenant_id", "empty"),
    ([("type", "x"), ("type", "")], "type", "empty"),
    ([("limit", "201")], "limit", "between"),
    ([("limit", "1.0")], "limit", "integer"),
    ([("cursor", "A" * 21)], "cursor", "does not match"),
    ([("status", "c")], "status", "one of"),
    ([("tenant_id", "nope")], "tenant_id", "UUID"),
    ([("since", "99999999999d")], "since", "duration"),
    ([("type", "a\x00b")], "type", "NUL"),
])
def test_check_query_refuses_naming_the_parameter(pairs: list[tuple[str, str]], param: str,
                                                  says: str) -> None:
    assert says in refused(lambda: check_query(pairs, PARAMS), param)


@pytest.mark.parametrize("kind", [Integer(0, 5, 1), Text(), Choice(("a",)), Uuid(),
                                  TimeOrAgo(), Text(max_length=22, pattern=CURSOR_PATTERN)])
def test_each_kind_states_its_rule(kind: Any) -> None:
    schema = kind.schema()
    assert schema["type"] in ("integer", "string")
    if schema["type"] == "integer":
        assert schema["minimum"] == 0 and schema["maximum"] == 5
    elif "enum" not in schema and "format" not in schema:
        assert schema["minLength"] == 1 and schema["maxLength"] >= 1


def test_cursors_and_positions_have_one_shape() -> None:
    refused(lambda: decode_cursor(""), "cursor")
    refused(lambda: decode_cursor("A" * 23), "cursor")
    assert decode_cursor("A" * 22).int == 0
    assert re.search(POSITION_PATTERN, "12:34")
    for junk in ("", "1", ":", "1:", "-1:2", "9223372036854775808:1", "1:2:3", "1 :2"):
        refused(lambda j=junk: decode_position(j), "cursor")


def test_page_and_event_queries_refuse_empty_and_overflowing_values() -> None:
    for pairs in ([("cursor", "")], [("limit", "")], [("limit", "9" * 30)]):
        refused(lambda p=pairs: parse_page_query(p))
    for name, value in (("from", "9223372036854775808"), ("from", ""), ("since", ""),
                        ("since", "99999999999d"), ("stream", ""), ("type", ""),
                        ("cursor", "")):
        refused(lambda n=name, v=value: parse_event_query([(n, v)], now=NOW), name)
    query = parse_event_query([("from", str(INT64_MAX))], now=NOW)
    assert query.filter.min_position == INT64_MAX


@pytest.mark.parametrize("name", ["tenant_id", "environment_id", "api_key_id", "model",
                                  "start", "end", "granularity", "group_by"])
def test_an_empty_usage_filter_is_refused(name: str) -> None:
    with pytest.raises(UsageQueryError) as info:
        parse_usage_query([(name, "")], now=NOW)
    assert info.value.param == name and "empty" in info.value.message


@pytest.mark.parametrize(("name", "value"), [
    ("model", "a\x00b"), ("model", "m" * 201), ("start", "99999999999d"),
    ("end", "99999999999h"), ("start", "0001-01-01T00:00:00+01:00"),
    ("end", "9999-12-31T23:30:00Z"),
])
def test_usage_values_out_of_bounds_are_refused(name: str, value: str) -> None:
    with pytest.raises(UsageQueryError) as info:
        parse_usage_query([(name, value)], now=NOW)
    assert info.value.param == name


# --------------------------------------------------------------------------- bodies' rules


def test_prices_as_the_document_states_them() -> None:
    model = {"name": "m", "family": "f", "vram_gb": 1, "context_length": 1,
             "output_price_per_million": "1"}
    ok = decode_body(msgspec.json.encode({**model, "input_price_per_million": 0.000123}),
                     ModelCreate)
    assert ok.input_price_per_million == Decimal("0.000123")
    refused(lambda: decode_body(msgspec.json.encode(
        {**model, "input_price_per_million": ""}), ModelCreate), "input_price_per_million")


def test_subscriptions_are_typed_by_kind() -> None:
    body = msgspec.json.decode(b'{"kind": "email", "target": "ops@acme.test", '
                               b'"event_types": ["node.*"]}', type=NotificationSubscriptionCreate)
    assert isinstance(body, EmailSubscriptionCreate) and body.kind == "email"
    generic = msgspec.json.decode(b'{"kind": "generic", "target": "https://x.test/h", '
                                  b'"event_types": ["node.*"], "secret": null}',
                                  type=NotificationSubscriptionCreate)
    assert isinstance(generic, GenericSubscriptionCreate) and generic.kind == "generic"
    assert "secret" in refused(lambda: decode_body(
        b'{"kind": "email", "target": "a@b.c", "event_types": ["n.*"], "secret": "x"}',
        NotificationSubscriptionCreate), "secret")  # type: ignore[arg-type]
    schema = msgspec.json.schema(EmailSubscriptionCreate)["$defs"]["EmailSubscriptionCreate"]
    assert not re.search(schema["properties"]["target"]["pattern"], "0")


def test_white_space_is_pythons_in_the_documents_patterns() -> None:
    """The server's checks refuse white space as Python counts it (`str.isspace`, `\\s` in a
    `re` pattern); WHITE_SPACE_CLASS, which the document's patterns use in its place (JSON
    Schema's `\\s` is another set), names exactly those characters."""
    every = [chr(c) for c in range(sys.maxunicode + 1)]
    assert "".join(c for c in every if c.isspace()) == WHITE_SPACE
    assert "".join(c for c in every if re.fullmatch(r"\s", c)) == WHITE_SPACE
    assert "".join(c for c in every if re.fullmatch(f"[{WHITE_SPACE_CLASS}]", c)) == WHITE_SPACE
    # The document's pattern of a generic target (check_target refuses white space).
    schema = msgspec.json.schema(GenericSubscriptionCreate)["$defs"]
    pattern = re.compile(schema["GenericSubscriptionCreate"]["properties"]["target"]["pattern"])
    assert pattern.search("https://example.test/hook?x=1")
    for space in WHITE_SPACE:
        assert not pattern.search(f"https://example.test/ho{space}ok"), repr(space)
