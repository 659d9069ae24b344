"""The Alertmanager intake is never open to the network without a strong token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.infra.settings import Secret, SettingsError
from services.notifier.settings import NotifierSettings, check_settings, is_loopback

TOKEN = "alertmanager-unit-token-3f9a1c7e5b2d8046"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("10.0.0.5", False), ("notifier.internal", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_without_a_token_is_allowed() -> None:
    check_settings(NotifierSettings(http_host="127.0.0.1"))
    check_settings(NotifierSettings(http_host="::1"))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5"])
def test_an_open_intake_without_a_token_refuses_to_start(host: str) -> None:
    with pytest.raises(SettingsError) as refused:
        check_settings(NotifierSettings(http_host=host))
    message = str(refused.value)
    assert message.startswith("ALERTMANAGER_TOKEN is empty")
    assert "HTTP_HOST" in message and "secrets.token_urlsafe(32)" in message
    check_settings(NotifierSettings(http_host=host, alertmanager_token=Secret(TOKEN)))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize("token", ["REPLACE_ME", "am-token"])
def test_a_weak_token_refuses_to_start_wherever_it_listens(host: str, token: str) -> None:
    with pytest.raises(SettingsError, match=r"^ALERTMANAGER_TOKEN is (a placeholder|too short)"):
        check_settings(NotifierSettings(http_host=host, alertmanager_token=Secret(token)))


def test_the_notifier_refuses_to_start_open_without_a_token() -> None:
    """A real start: `python -m services.notifier` listening everywhere, no token."""
    env = {k: v for k, v in os.environ.items() if k != "ALERTMANAGER_TOKEN"}
    env["HTTP_HOST"] = "0.0.0.0"
    result = subprocess.run([sys.executable, "-m", "services.notifier"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "ALERTMANAGER_TOKEN is empty while HTTP_HOST is '0.0.0.0'" in result.stderr
