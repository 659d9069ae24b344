"""The admin CLI's pure parts: where the API is, error bodies, tables, expiry times."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.cli.admin_client import (
    DEFAULT_ADMIN_URL,
    AdminApiError,
    AdminClient,
    AdminConfigError,
    read_dev_admin,
    resolve_target,
)
from services.cli.admin_format import (
    KEY_COLUMNS,
    cell,
    format_object,
    format_table,
    new_key_message,
    parse_expires,
)


def test_target_precedence(tmp_path: Path) -> None:
    (tmp_path / "urls.json").write_text(json.dumps({
        "database_url": "postgresql://x", "admin_url": "http://dev:1", "admin_token": "dev-t"}))
    env = {"CROSSLOGIC_ADMIN_URL": "http://env:2", "CROSSLOGIC_ADMIN_TOKEN": "env-t",
           "ADMIN_API_TOKEN": "api-t"}
    assert resolve_target("http://flag:3/", "flag-t", env, tmp_path).url == "http://flag:3"
    assert resolve_target("http://flag:3/admin/v1/", "t", env, tmp_path).url == "http://flag:3"
    assert resolve_target("http://flag:3", "flag-t", env, tmp_path).token == "flag-t"
    from_env = resolve_target(None, None, env, tmp_path)
    assert (from_env.url, from_env.token) == ("http://env:2", "env-t")
    from_dev = resolve_target(None, None, {}, tmp_path)
    assert (from_dev.url, from_dev.token) == ("http://dev:1", "dev-t")
    assert resolve_target("http://dev:1/admin/v1", None, {}, tmp_path).token == "dev-t"
    nowhere = tmp_path / "missing"
    assert resolve_target(None, "t", {}, nowhere).url == DEFAULT_ADMIN_URL
    api = resolve_target(None, None, {"ADMIN_API_TOKEN": "api-t"}, nowhere)
    assert (api.url, api.token) == (DEFAULT_ADMIN_URL, "api-t")
    with pytest.raises(AdminConfigError, match="CROSSLOGIC_ADMIN_TOKEN"):
        resolve_target(None, None, {}, nowhere)
    with pytest.raises(AdminConfigError, match="http"):
        resolve_target("ftp://x", "t", {}, nowhere)
    # The token never shows in a repr.
    target = resolve_target(None, None, env, tmp_path)
    assert "env-t" not in repr(target) and "env-t" not in repr(AdminClient(target))


def test_url_and_token_come_from_one_source(tmp_path: Path) -> None:
    """A production token in the environment never goes to a local `crosslogic dev`, and the
    dev platform's token never goes to another API."""
    (tmp_path / "urls.json").write_text(json.dumps({
        "admin_url": "http://127.0.0.1:8081", "admin_token": "dev-t"}))
    for env in ({"CROSSLOGIC_ADMIN_TOKEN": "prod-t"}, {"ADMIN_API_TOKEN": "prod-t"}):
        with pytest.raises(AdminConfigError, match="CROSSLOGIC_ADMIN_URL"):
            resolve_target(None, None, env, tmp_path)
    with pytest.raises(AdminConfigError, match="CROSSLOGIC_ADMIN_URL"):
        resolve_target(None, "prod-t", {}, tmp_path)
    prod = resolve_target(None, None, {"CROSSLOGIC_ADMIN_TOKEN": "prod-t",
                                       "CROSSLOGIC_ADMIN_URL": "https://admin.prod"}, tmp_path)
    assert (prod.url, prod.token) == ("https://admin.prod", "prod-t")
    with pytest.raises(AdminConfigError, match=r"no admin token for https://admin\.prod"):
        resolve_target(None, None, {"CROSSLOGIC_ADMIN_URL": "https://admin.prod"}, tmp_path)
    with pytest.raises(AdminConfigError, match="no admin token"):
        resolve_target("https://admin.prod", None, {}, tmp_path)
    # A dev platform whose services are not up yet (no admin fields): nothing to mix up.
    (tmp_path / "urls.json").write_text(json.dumps({"database_url": "postgresql://x"}))
    assert resolve_target(None, None, {"CROSSLOGIC_ADMIN_TOKEN": "t"}, tmp_path).url == \
        DEFAULT_ADMIN_URL


@pytest.mark.parametrize("content", ["", "not json", "[1]", '{"database_url": "x"}',
                                     '{"admin_url": 5, "admin_token": ""}'])
def test_dev_state_without_admin_fields_is_tolerated(tmp_path: Path, content: str) -> None:
    (tmp_path / "urls.json").write_text(content)
    assert read_dev_admin(tmp_path) == {}


def test_api_errors_from_bodies() -> None:
    body = json.dumps({"error": {"message": "Invalid 'name'.", "type": "invalid_request_error",
                                 "param": "name", "code": None}}).encode()
    err = AdminApiError.from_body(400, body)
    assert (err.status, err.param, err.type) == (400, "name", "invalid_request_error")
    assert str(err) == "Invalid 'name'. (field: name)"
    assert str(AdminApiError.from_body(502, b"<html>bad gateway</html>")) == \
        "HTTP 502: <html>bad gateway</html>"
    assert str(AdminApiError.from_body(500, b"")) == "HTTP 500"


def test_cells() -> None:
    assert cell(None) == "-" and cell("") == "-" and cell([]) == "-"
    assert cell(True) == "yes" and cell(False) == "no"
    assert cell(["us-east-1", "eu-west-1"]) == "us-east-1,eu-west-1"
    assert cell("2030-01-02T03:04:05.123456Z") == "2030-01-02 03:04:05"
    assert cell("2030-01-02T03:04:05+00:00") == "2030-01-02 03:04:05"
    assert cell("0.15") == "0.15" and cell(8192) == "8192"


def test_table_and_object() -> None:
    rows = [{"id": "k1", "name": "ci", "last_four": "abcd", "role": "developer",
             "status": "active", "environment_id": "e1", "expires_at": None,
             "created_at": "2030-01-02T03:04:05Z"},
            {"id": "k22", "name": "", "last_four": "wxyz", "role": "readonly",
             "status": "revoked", "environment_id": "e1", "expires_at": None,
             "created_at": "2030-01-02T03:04:06Z"}]
    lines = format_table(rows, KEY_COLUMNS).splitlines()
    assert lines[0].split() == ["ID", "NAME", "KEY", "ROLE", "STATUS", "ENVIRONMENT",
                                "EXPIRES", "CREATED"]
    assert lines[1].startswith("k1   ci  ") and lines[2].startswith("k22  -   ")
    assert all(line == line.rstrip() for line in lines)
    assert lines[1].index("abcd") == lines[0].index("KEY")
    text = format_object({"id": "e", "quota": {"requests_per_minute": 5,
                                               "tokens_per_day": None}})
    assert text.splitlines() == ["id                         e",
                                 "quota.requests_per_minute  5",
                                 "quota.tokens_per_day       -"]


def test_new_key_message_shows_the_key_once() -> None:
    text = new_key_message({"id": "k", "environment_id": "e", "role": "developer",
                            "key": "clsk_live_abc", "last_four": "_abc"})
    assert text.count("clsk_live_abc") == 1 and "only time" in text


def test_parse_expires() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_expires("30d", now) == "2030-01-31T00:00:00Z"
    assert parse_expires("12h", now) == "2030-01-01T12:00:00Z"
    assert parse_expires("90m", now) == "2030-01-01T01:30:00Z"
    assert parse_expires("2031-05-06T07:08:09", now) == "2031-05-06T07:08:09Z"
    assert parse_expires("2031-05-06T09:08:09+02:00", now) == "2031-05-06T07:08:09Z"
    with pytest.raises(ValueError, match="--expires"):
        parse_expires("next week", now)
