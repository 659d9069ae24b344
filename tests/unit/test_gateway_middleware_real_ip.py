"""Real client IP: the peer, unless a trusted proxy forwarded the request."""

from __future__ import annotations

import pytest

from services.gateway.real_ip import (
    DEFAULT_TRUSTED_PROXIES,
    UNKNOWN,
    TrustedProxies,
    client_ip,
    parse_address,
    parse_ip,
)

LOOPBACK = TrustedProxies(DEFAULT_TRUSTED_PROXIES)
BEHIND_LB = TrustedProxies(("127.0.0.1/32", "::1/128", "10.0.0.0/8", "fd00::/8"))
NOBODY = TrustedProxies(())


@pytest.mark.parametrize(("text", "expected"), [
    ("1.2.3.4", "1.2.3.4"),
    ("  1.2.3.4 ", "1.2.3.4"),
    ("1.2.3.4:8080", "1.2.3.4"),
    ("::1", "::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:DB8::0:1", "2001:db8::1"),
])
def test_parse_ip_reads_what_proxies_write(text: str, expected: str) -> None:
    assert parse_ip(text) == expected


@pytest.mark.parametrize("text", ["", "unknown", "1.2.3", "[::1", "999.1.1.1", "a:b:c",
                                  "1.2.3.4:80:90", "<script>"])
def test_parse_ip_refuses_garbage(text: str) -> None:
    assert parse_ip(text) is None


def test_parse_address_gives_family_and_integer() -> None:
    assert parse_address("10.0.0.1") == (4, 0x0A000001, "10.0.0.1")
    assert parse_address("::ffff:10.0.0.1") == (4, 0x0A000001, "10.0.0.1")
    assert parse_address("::1") == (6, 1, "::1")


def test_trusted_proxies_match_by_family() -> None:
    assert "10.9.8.7" in BEHIND_LB
    assert "fd12::1" in BEHIND_LB
    assert "11.0.0.1" not in BEHIND_LB
    assert "::1" in LOOPBACK
    assert "::ffff:127.0.0.1" in LOOPBACK
    assert "127.0.0.2" not in LOOPBACK  # /32: exactly the one address
    assert "::2" not in LOOPBACK
    assert "0.0.0.1" not in TrustedProxies(("::/0",))  # an IPv6 range holds no IPv4 address
    assert "garbage" not in BEHIND_LB
    assert 167772161 not in BEHIND_LB  # only text is looked up
    assert not NOBODY
    assert LOOPBACK
    assert "203.0.113.200" in TrustedProxies(("203.0.113.7/24",))  # host bits ignored


def test_trusted_proxies_reject_bad_cidrs() -> None:
    with pytest.raises(ValueError, match="does not appear"):
        TrustedProxies(("10.0.0.0/8", "not-a-network"))


def test_no_forwarding_headers_means_the_peer() -> None:
    assert client_ip("198.51.100.7", None, None, BEHIND_LB) == "198.51.100.7"
    assert client_ip("::ffff:198.51.100.7", None, None, LOOPBACK) == "198.51.100.7"
    assert client_ip(None, "1.2.3.4", None, LOOPBACK) == UNKNOWN


def test_untrusted_peer_cannot_choose_its_address() -> None:
    assert client_ip("198.51.100.7", "1.1.1.1", "2.2.2.2", BEHIND_LB) == "198.51.100.7"
    assert client_ip("127.0.0.1", "1.1.1.1", None, NOBODY) == "127.0.0.1"


def test_right_most_untrusted_hop_is_the_client() -> None:
    # client 203.0.113.9 → LB 10.0.0.5 → LB 10.0.0.6 → us; the client prepended a lie.
    xff = "6.6.6.6, 203.0.113.9, 10.0.0.5"
    assert client_ip("10.0.0.6", xff, None, BEHIND_LB) == "203.0.113.9"
    # With only loopback trusted, a 10.x peer is not ours: it is the client.
    assert client_ip("10.0.0.6", xff, None, LOOPBACK) == "10.0.0.6"
    # A local proxy trusted, but 10.0.0.5 is not: it is the client as far as we know.
    assert client_ip("127.0.0.1", xff, None, LOOPBACK) == "10.0.0.5"


def test_forwarded_entries_with_ports_and_ipv6() -> None:
    assert client_ip("::1", "[2001:db8::7]:5555", None, LOOPBACK) == "2001:db8::7"
    assert client_ip("127.0.0.1", "203.0.113.9:1234", None, LOOPBACK) == "203.0.113.9"


def test_all_hops_trusted_gives_the_left_most() -> None:
    assert client_ip("127.0.0.1", "10.1.1.1, 10.2.2.2", None, BEHIND_LB) == "10.1.1.1"


def test_garbage_stops_at_the_last_trusted_hop() -> None:
    assert client_ip("127.0.0.1", "1.2.3.4, bogus, 10.0.0.5", None, BEHIND_LB) == "10.0.0.5"
    assert client_ip("127.0.0.1", "bogus", None, BEHIND_LB) == "127.0.0.1"
    assert client_ip("127.0.0.1", "1.2.3.4,,10.0.0.5", None, BEHIND_LB) == "10.0.0.5"


def test_x_real_ip_only_without_x_forwarded_for() -> None:
    assert client_ip("127.0.0.1", None, "203.0.113.9", LOOPBACK) == "203.0.113.9"
    assert client_ip("127.0.0.1", "198.51.100.1", "203.0.113.9", LOOPBACK) == "198.51.100.1"
    assert client_ip("127.0.0.1", None, "garbage", LOOPBACK) == "127.0.0.1"
    assert client_ip("198.51.100.7", None, "203.0.113.9", LOOPBACK) == "198.51.100.7"
