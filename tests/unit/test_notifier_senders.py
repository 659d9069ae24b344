"""The sender's guards: only public addresses (unless allowed), errors without secrets."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from services.domain.notifications.targets import Kind
from services.notifier.senders import (
    PublicOnlyResolver,
    Sender,
    Target,
    TargetNotAllowed,
    _literal_allowed,
    public_address,
)


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("::1", False), ("fe80::1", False), ("fd00::1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("::ffff:127.0.0.1", False),
    ("100.64.0.1", False),
])
def test_public_addresses(address: str, public: bool) -> None:
    assert public_address(address) is public


def test_literal_hosts_are_checked_before_any_request() -> None:
    _literal_allowed("https://8.8.8.8/hook")
    _literal_allowed("https://hooks.slack.com/services/a/b/c")  # names: the resolver checks
    for url in ("http://127.0.0.1:8080/x", "http://[::1]/x", "http://localhost/x",
                "http://api.localhost/x", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(TargetNotAllowed):
            _literal_allowed(url)


async def test_names_resolving_to_private_addresses_are_refused() -> None:
    resolver = PublicOnlyResolver()
    try:
        with pytest.raises(TargetNotAllowed, match="non-public"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


def test_errors_never_carry_the_target_or_secret() -> None:
    target = Target(uuid.uuid4(), None, Kind.SLACK,
                    "https://hooks.slack.com/services/T1/B1/SeCrEtToKeN", "", "masked")
    exc = aiohttp.InvalidURL(target.address)
    text = Sender._error(exc, target)
    assert "SeCrEtToKeN" not in text and "InvalidURL" in text
    assert "SeCrEtToKeN" not in repr(target)
