"""Typed settings from the environment; secrets never shown."""

from __future__ import annotations

import pytest

from services.core.settings import CoreSettings, Secret, SettingsError, load_settings, redact_url


class GatewaySettings(CoreSettings, kw_only=True, frozen=True):
    admin_token: Secret = Secret("")
    workers: int = 1
    ratio: float = 0.5


def test_fields_come_from_upper_cased_variables() -> None:
    s = load_settings(GatewaySettings, {"HTTP_PORT": "9000", "LOG_JSON": "false",
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
    s = load_settings(GatewaySettings, {"ADMIN_TOKEN": "s3cret",
                                        "DATABASE_URL": "postgresql://u:pw@h/db"})
    text = repr(s) + str(s) + str(s.admin_token) + f"{s.database_url}"
    assert "s3cret" not in text and "pw@" not in text
    assert "**********" in repr(s.admin_token)
    assert not Secret("") and Secret("x")
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


def test_redact_url() -> None:
    assert redact_url("postgresql://user:pw@db:5432/x") == "postgresql://user:***@db:5432/x"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
