"""Typed settings from the environment; secrets never shown."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from services.admin.settings import AdminSettings
from services.admin.settings import check_settings as check_admin_settings
from services.gateway.settings import GatewaySettings
from services.infra.settings import (
    MAKE_A_TOKEN,
    CoreSettings,
    Secret,
    SettingsError,
    load_settings,
    redact_url,
    require_strong_token,
    weak_token_reason,
)


class ServiceSettings(CoreSettings, kw_only=True, frozen=True):
    """A service's settings, as a subclass declares them."""

    admin_token: Secret = Secret("")
    workers: int = 1
    ratio: float = 0.5


def test_fields_come_from_upper_cased_variables() -> None:
    s = load_settings(ServiceSettings, {"HTTP_PORT": "9000", "LOG_JSON": "false",
                                        "WORKERS": "4", "RATIO": "0.25",
                                        "ADMIN_TOKEN": "s3cret", "UNRELATED": "x"})
    assert (s.http_port, s.log_json, s.workers, s.ratio) == (9000, False, 4, 0.25)
    assert s.admin_token.reveal() == "s3cret"


def test_overrides_win_and_none_means_unset() -> None:
    s = load_settings(CoreSettings, {"HTTP_PORT": "9000"}, http_port=None, log_level="debug")
    assert s.http_port == 9000 and s.log_level == "debug"
    s = load_settings(CoreSettings, {}, database_url=Secret("postgresql://a@b/c"))
    assert s.database_url.reveal() == "postgresql://a@b/c"


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="HTTP_PORT"):
        load_settings(CoreSettings, {"HTTP_PORT": "eighty"})


def test_secrets_never_show_in_repr_or_str() -> None:
    s = load_settings(ServiceSettings, {"ADMIN_TOKEN": "s3cret",
                                        "DATABASE_URL": "postgresql://u:pw@h/db"})
    text = repr(s) + str(s) + str(s.admin_token) + f"{s.database_url}"
    assert "s3cret" not in text and "pw@" not in text
    assert "**********" in repr(s.admin_token)
    assert not Secret("") and Secret("x")
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


def test_redact_url() -> None:
    assert redact_url("postgresql://user:pw@db:5432/x") == "postgresql://user:***@db:5432/x"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------- shared tokens

STRONG = "Vq3m9ZKx0p7L2wB8sYt4nR1cH6dJ5fGa"  # 32 characters, like token_urlsafe(24)


@pytest.mark.parametrize(("token", "reason"), [
    ("", "is empty"),
    ("   ", "is empty"),
    ("REPLACE_ME", "placeholder"),
    ("replace-me-with-a-long-random-string-please", "placeholder"),
    ("CHANGEME" + "x" * 40, "placeholder"),
    ("<your-token-here>" + "q" * 30, "placeholder"),
    ("Example-Token-0123456789abcdefghijklmnop", "placeholder"),
    ("s3cret", "too short (6 characters; at least 32)"),
    (STRONG[:31], "too short (31 characters"),
    ("a" * 64, "repeated pattern"),
    ("abab" * 10, "repeated pattern"),
])
def test_weak_tokens_are_named_with_their_reason(token: str, reason: str) -> None:
    found = weak_token_reason(token)
    assert found is not None and reason in found
    assert token.strip() == "" or token not in found  # the reason never quotes the token


@pytest.mark.parametrize("token", [
    STRONG,
    secrets.token_urlsafe(32),
    secrets.token_hex(16),  # `openssl rand -hex 16`: 32 characters of 16 symbols
    secrets.token_hex(24),
    "admin-test-token-6f1c2b9e8d7a4c3b",
])
def test_random_tokens_pass(token: str) -> None:
    assert weak_token_reason(token) is None


def test_require_strong_token_names_the_variable_and_how_to_make_one() -> None:
    require_strong_token("ADMIN_TOKEN", Secret(STRONG))
    with pytest.raises(SettingsError) as refused:
        require_strong_token("ADMIN_TOKEN", Secret("REPLACE_ME"), "it opens the admin API")
    message = str(refused.value)
    assert message.startswith("ADMIN_TOKEN is a placeholder")
    assert "it opens the admin API" in message
    assert MAKE_A_TOKEN in message and "secrets.token_urlsafe(32)" in message


def test_the_suggested_command_makes_a_token_that_passes() -> None:
    made = subprocess.run([sys.executable, "-c", MAKE_A_TOKEN.split('"')[1]],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert weak_token_reason(made) is None


@pytest.mark.parametrize("token", ["", "REPLACE_ME", "changeme", "short-token"])
def test_admin_settings_refuse_a_weak_token(token: str) -> None:
    with pytest.raises(SettingsError, match=r"^ADMIN_TOKEN "):
        check_admin_settings(AdminSettings(admin_token=Secret(token)))
    check_admin_settings(AdminSettings(admin_token=Secret(STRONG)))


def test_the_admin_service_refuses_to_start_with_a_placeholder_token() -> None:
    """A real start: `python -m services.admin` exits before opening anything."""
    env = {**os.environ, "ADMIN_TOKEN": "REPLACE_ME"}
    result = subprocess.run([sys.executable, "-m", "services.admin"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "ADMIN_TOKEN is a placeholder" in result.stderr
    assert "secrets.token_urlsafe(32)" in result.stderr


def test_the_gateway_takes_no_admin_token() -> None:
    """It never used one: a setting nobody reads only invites a weak value."""
    assert "admin_token" not in GatewaySettings.__struct_fields__


def test_every_pool_has_a_statement_timeout_by_default() -> None:
    assert CoreSettings().db_statement_timeout_ms == 30_000
    s = load_settings(CoreSettings, {"DB_STATEMENT_TIMEOUT_MS": "1500"})
    assert s.db_statement_timeout_ms == 1500


def test_a_placeholder_password_in_a_url_is_refused() -> None:
    """A manifest deployed before its secrets were filled in: refused, naming the variable;
    a URL with no password (a local server) or a real one is fine."""
    from services.infra.settings import placeholder_password

    assert placeholder_password("postgresql://crosslogic:REPLACE_ME@postgres:5432/db")
    assert placeholder_password("redis://:change-me@redis:6379/0")
    assert not placeholder_password("postgresql://postgres@127.0.0.1:5432/db")
    assert not placeholder_password("redis://:x9Vq3k2LmTz8@redis:6379/0")
    with pytest.raises(SettingsError, match="REDIS_URL has a placeholder"):
        load_settings(CoreSettings, {"REDIS_URL": "redis://:REPLACE_ME@redis:6379/0"})


# --------------------------------------------------------------------------- the reference's names


def test_admin_api_token_is_the_reference_s_name_for_admin_token() -> None:
    token = secrets.token_urlsafe(32)
    s = load_settings(AdminSettings, {"ADMIN_API_TOKEN": token})
    assert s.admin_token.reveal() == token
    both = load_settings(AdminSettings, {"ADMIN_API_TOKEN": token, "ADMIN_TOKEN": token})
    assert both.admin_token.reveal() == token
    with pytest.raises(SettingsError, match="ADMIN_TOKEN and ADMIN_API_TOKEN are both set"):
        load_settings(AdminSettings, {"ADMIN_API_TOKEN": token, "ADMIN_TOKEN": token + "x"})
    # The weak-token check holds whichever name carried it.
    with pytest.raises(SettingsError, match="ADMIN_TOKEN is a placeholder"):
        check_admin_settings(load_settings(AdminSettings, {"ADMIN_API_TOKEN": "REPLACE_ME"}))


def test_redis_password_goes_into_the_redis_url() -> None:
    """The reference gives REDIS_PASSWORD apart from REDIS_URL; redis-py then sends it."""
    import redis.asyncio as aioredis

    password = "p@ss:w/rd#1"
    s = load_settings(CoreSettings, {"REDIS_URL": "redis://redis:6379/0",
                                     "REDIS_PASSWORD": password})
    client = aioredis.from_url(s.redis_url.reveal())
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["host"], kwargs["port"], kwargs["db"]) == (
        password, "redis", 6379, 0)
    assert password not in repr(s)
    # Into the default URL when REDIS_URL is not set; a URL with that very password is fine.
    default = load_settings(CoreSettings, {"REDIS_PASSWORD": "x9Vq3k2LmTz8"})
    assert default.redis_url.reveal() == "redis://:x9Vq3k2LmTz8@127.0.0.1:6379/0"
    same = load_settings(CoreSettings, {"REDIS_URL": "redis://:x9Vq3k2LmTz8@redis:6379/0",
                                        "REDIS_PASSWORD": "x9Vq3k2LmTz8"})
    assert same.redis_url.reveal() == "redis://:x9Vq3k2LmTz8@redis:6379/0"
    with pytest.raises(SettingsError, match="REDIS_URL has a password and REDIS_PASSWORD"):
        load_settings(CoreSettings, {"REDIS_URL": "redis://:other@redis:6379/0",
                                     "REDIS_PASSWORD": "x9Vq3k2LmTz8"})
    with pytest.raises(SettingsError, match="REDIS_URL has a placeholder"):
        load_settings(CoreSettings, {"REDIS_PASSWORD": "REPLACE_ME"})
    # Empty is unset (a compose file's `REDIS_PASSWORD=`).
    assert load_settings(CoreSettings, {"REDIS_PASSWORD": ""}).redis_url == \
        CoreSettings().redis_url


@pytest.mark.parametrize(("env", "own_port"), [
    ({}, True), ({}, False),
    ({"PROMETHEUS_ENABLED": "false"}, True), ({"PROMETHEUS_ENABLED": "false"}, False)])
async def test_prometheus_enabled_false_serves_no_metrics(env: dict[str, str],
                                                          own_port: bool) -> None:
    """The reference's PROMETHEUS_ENABLED: false, no /metrics on the service's port nor on
    METRICS_PORT (nothing listens there)."""
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    from services.infra.devstack import free_port
    from services.infra.http import Needs, create_app

    enabled = not env
    port = 0 if own_port else free_port()
    settings = load_settings(CoreSettings, env, metrics_port=port)
    async with TestClient(TestServer(create_app(settings, needs=Needs(
            postgres=False, redis=False, nats=False)), host="127.0.0.1")) as client:
        assert (await client.get("/health")).status == 200
        assert (await client.get("/metrics")).status == (200 if enabled and own_port else 404)
        if own_port:
            return
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/metrics"
            if enabled:
                async with session.get(url) as r:
                    assert r.status == 200
            else:
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with session.get(url):
                        pass
