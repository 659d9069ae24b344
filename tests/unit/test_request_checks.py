"""The admin API's pure parts: body decoding errors named by field, semantic checks, paging
cursors, query strings, quota merging, masking, settings."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.events import Quota
from services.admin.bodies import (
    DeploymentCreate,
    EnvironmentPatch,
    TenantCreate,
)
from services.domain.catalog import Invalid, merge_quota
from services.domain.catalog.bodies import (
    EnvironmentCreate,
    KeyCreate,
    KeyWithSecret,
    StatusChange,
)
from services.domain.catalog.model_commands import check_node_bounds
from services.domain.catalog.queries import KeyLimits, plain_decimal
from services.infra.log_records import START, LogPosition
from services.infra.request_checks import (
    FieldError,
    check_future,
    check_price,
    check_unique,
    decode_body,
    decode_cursor,
    decode_position,
    describe_validation_error,
    encode_cursor,
    next_cursor,
    parse_event_query,
    parse_page_query,
)


@pytest.mark.parametrize(("error", "message", "param"), [
    ("Expected `int` >= 0 - at `$.quota.requests_per_minute`",
     "Invalid 'quota.requests_per_minute': expected `int` >= 0.", "quota.requests_per_minute"),
    ("Object contains unknown field `x`", "Unknown field 'x'.", "x"),
    ("Object contains unknown field `x` - at `$.limits`", "Unknown field 'limits.x'.",
     "limits.x"),
    ("Object missing required field `name`", "Missing required field 'name'.", "name"),
    ("Expected `str` of length >= 1 - at `$.regions[1]`",
     "Invalid 'regions[1]': expected `str` of length >= 1.", "regions[1]"),
    ("Expected `object`, got `array`", "Invalid request body: Expected `object`, got `array`.",
     None),
])
def test_validation_errors_name_the_field(error: str, message: str, param: str | None) -> None:
    assert describe_validation_error(error) == (message, param)


def test_decode_body() -> None:
    assert decode_body(b"", StatusChange).reason == ""  # no body reads as {}
    assert decode_body(b' {"name": "a"} ', TenantCreate).name == "a"
    env = decode_body(b'{"name": "p", "region": "us-east-1"}', EnvironmentCreate)
    assert env.quota.requests_per_minute is None
    cases = [
        (b'{"name": ', TenantCreate, None, "not valid JSON"),
        (b'{"bogus": 1, "name": ', TenantCreate, None, "not valid JSON"),
        (b'{"name": "a", "bogus": 1}', TenantCreate, "bogus", "Unknown field"),
        (b"{}", TenantCreate, "name", "Missing required field"),
        (b'{"name": "a", "email": "not an address"}', TenantCreate, "email", "email"),
        (b'{"quota": {"tokens_per_day": -5}}', EnvironmentPatch, "quota.tokens_per_day", ">="),
        (b'{"role": "root"}', KeyCreate, "role", "role"),
        (b'{"expires_at": "2030-01-01T00:00:00"}', KeyCreate, "expires_at", "timezone"),
        (b'{"model": "m", "regions": [], "gpu_type": "g", "spot": true, "min_nodes": 0, '
         b'"max_nodes": 1}', DeploymentCreate, "regions", "length >= 1"),
    ]
    for body, type_, param, text in cases:
        with pytest.raises(FieldError) as err:
            decode_body(body, type_)
        assert err.value.param == param, body
        assert text in err.value.message, (body, err.value.message)


def test_prices() -> None:
    assert check_price(Decimal("0.15"), "p") == Decimal("0.15")
    assert check_price(Decimal("0.123456"), "p") == Decimal("0.123456")
    assert check_price(Decimal("1.500000000"), "p") == Decimal("1.5")  # trailing zeros are fine
    assert check_price(Decimal(0), "p") == 0
    for bad, text in ((Decimal("0.1234567"), "decimal places"), (Decimal(-1), "0 or more"),
                      (Decimal("NaN"), "finite"), (Decimal("sNaN"), "finite"),
                      (Decimal("Infinity"), "finite"), (Decimal("1e14"), "below")):
        with pytest.raises(FieldError, match=text) as err:
            check_price(bad, "input_price_per_million")
        assert err.value.param == "input_price_per_million"


def test_plain_decimal_reads_back_as_typed() -> None:
    assert str(plain_decimal(Decimal("0.100000"))) == "0.1"
    assert str(plain_decimal(Decimal("100.000000"))) == "100"
    assert str(plain_decimal(Decimal("0.000000"))) == "0"
    assert str(plain_decimal(Decimal("12.345600"))) == "12.3456"


def test_times_and_uniqueness() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert check_future(now + timedelta(seconds=1), "expires_at", now) > now
    with pytest.raises(FieldError, match="future"):
        check_future(now, "expires_at", now)
    check_unique(["a", "b"], "regions")
    with pytest.raises(FieldError) as err:
        check_unique(["a", "b", "a"], "regions")
    assert err.value.param == "regions[2]"


def test_cursors_round_trip_and_refuse_junk() -> None:
    some = uuid.uuid4()
    assert decode_cursor(encode_cursor(some)) == some
    assert "=" not in encode_cursor(some)
    for junk in ("", "!!", "abc", encode_cursor(some) + "AA"):
        with pytest.raises(FieldError) as err:
            decode_cursor(junk)
        assert err.value.param == "cursor"
    ids = [uuid.uuid4() for _ in range(3)]
    assert next_cursor(ids, 2) == encode_cursor(ids[1])
    assert next_cursor(ids[:2], 2) is None


def test_page_query() -> None:
    assert parse_page_query([]).limit == 50 and parse_page_query([]).after is None
    some = uuid.uuid4()
    page = parse_page_query([("limit", "10"), ("cursor", encode_cursor(some))])
    assert (page.limit, page.after) == (10, some)
    for pairs, param in (([("limit", "0")], "limit"), ([("limit", "201")], "limit"),
                         ([("limit", "ten")], "limit"), ([("offset", "1")], "offset"),
                         ([("limit", "1"), ("limit", "2")], "limit")):
        with pytest.raises(FieldError) as err:
            parse_page_query(pairs)
        assert err.value.param == param


def test_event_query() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    q = parse_event_query([("type", "node.*"), ("type", "tenant.created"),
                           ("stream", "tenant:*"), ("since", "10m"), ("from", "5"),
                           ("limit", "20"), ("cursor", "12:34")], now=now)
    assert q.filter.types == ("node.*", "tenant.created") and q.filter.stream == "tenant:*"
    assert q.filter.since == now - timedelta(minutes=10) and q.filter.min_position == 5
    assert (q.limit, q.after) == (20, LogPosition(12, 34))
    assert parse_event_query([]).after == START
    with pytest.raises(FieldError) as err:
        parse_event_query([("limit", "5")], paged=False)
    assert err.value.param == "limit"
    for pairs, param in (([("since", "soon")], "since"), ([("from", "-2")], "from"),
                         ([("cursor", "5")], "cursor"), ([("stream", "a b")], "stream"),
                         ([("type", "")], "type"), ([("stream", "a"), ("stream", "b")],
                                                    "stream")):
        with pytest.raises(FieldError) as err:
            parse_event_query(pairs)
        assert err.value.param == param
    assert decode_position("1:2", "Last-Event-ID") == LogPosition(1, 2)
    with pytest.raises(FieldError, match="Last-Event-ID"):
        decode_position("x:y", "Last-Event-ID")


def test_merge_quota() -> None:
    current = Quota(requests_per_minute=10, tokens_per_minute=20, tokens_per_day=30)
    assert merge_quota(current, {}) == current
    assert merge_quota(current, {"requests_per_minute": 5, "tokens_per_minute": None}) == \
        Quota(requests_per_minute=5, tokens_per_day=30)
    with pytest.raises(ValueError, match="bogus"):
        merge_quota(current, {"bogus": 1})


def test_node_bounds() -> None:
    check_node_bounds(0, 0)
    check_node_bounds(1, 4)
    with pytest.raises(Invalid) as err:
        check_node_bounds(3, 2)
    assert err.value.field == "max_nodes"
    with pytest.raises(Invalid) as err:
        check_node_bounds(-1, 2)
    assert err.value.field == "min_nodes"


def test_a_new_key_never_shows_in_a_repr() -> None:
    now = datetime.now(UTC)
    key = KeyWithSecret(id=uuid.uuid4(), tenant_id=uuid.uuid4(), environment_id=uuid.uuid4(),
                        name="ci", last_four="abcd", role="developer", status="active",
                        limits=KeyLimits(), expires_at=None, created_at=now, revoked_at=None,
                        key="clsk_live_secretsecret")
    assert "secret" not in repr(key) and "abcd" in repr(key)


def test_the_service_refuses_to_start_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ADMIN_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "services.admin"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "ADMIN_TOKEN is empty" in result.stderr
