"""Who hears what: patterns, tenant isolation, redaction; targets, masking, secrets."""

from __future__ import annotations

import base64
import random
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.domain.notifications.rules import (
    MAX_PATTERNS,
    PATTERN_REGEX,
    EventFacts,
    PatternError,
    SubscriptionRule,
    audience_allows,
    check_patterns,
    facts_of,
    heard_types,
    recipients,
    redact,
    unheard_types,
    wants,
)
from services.domain.notifications.targets import (
    SECRET_PATTERN,
    Kind,
    TargetError,
    check_signing_secret,
    check_target,
    generate_signing_secret,
    mask_target,
    scrub,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("patterns", [
    ["node.*"], ["*"], ["billing.payment_failed"], ["deployment.no_active_nodes"],
    ["node.status_changed", "tenant.suspended", "notification.*"],
    ["orchestrator.something_added_later"], ["node.?eplaced"], ["billing.*", "node.*"],
])
def test_patterns_accepted(patterns: list[str]) -> None:
    assert check_patterns(patterns) == patterns


@pytest.mark.parametrize(("patterns", "index", "says"), [
    (["node.heartbeat"], 0, "heartbeats"),
    (["node.*", "node.heartbeat"], 1, "node.heartbeat"),
    (["node.h*"], 0, "node.heartbeat"),
    (["usage.*"], 0, "usage events"),
    (["usage.recorded"], 0, "usage events"),
    (["usage.anything_later"], 0, "usage events"),
    (["Node.*"], 0, "not an event type pattern"),
    (["node.[ab]"], 0, "not an event type pattern"),
    (["node.*", "node.*"], 1, "twice"),
    ([], 0, "at least one"),
    ([f"t{i}.x" for i in range(MAX_PATTERNS + 1)], MAX_PATTERNS, "at most"),
])
def test_patterns_refused(patterns: list[str], index: int, says: str) -> None:
    with pytest.raises(PatternError, match=says) as caught:
        check_patterns(patterns)
    assert caught.value.index == index


def test_the_notifier_hears_nodes_and_control_but_not_heartbeats_or_usage() -> None:
    heard = heard_types()
    assert {"node.status_changed", "node.spot_warning", "deployment.no_active_nodes",
            "billing.payment_failed", "tenant.suspended", "notification.endpoint_disabled",
            "notification.alert"} <= heard
    assert {"node.heartbeat", "usage.recorded"} <= unheard_types()
    assert not heard & unheard_types()


# --------------------------------------------------------------------------- matching


def facts(event_type: str = "billing.payment_failed", *, tenant: uuid.UUID | None = None,
          at: datetime = T0, about: uuid.UUID | None = None) -> EventFacts:
    return EventFacts(uuid.uuid4(), event_type, at, tenant, about)


def rule(*patterns: str, tenant: uuid.UUID | None = None,
         created: datetime = T0 - timedelta(seconds=1)) -> SubscriptionRule:
    return SubscriptionRule(uuid.uuid4(), tenant, patterns, created)


def test_audience() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert audience_allows(None, None) and audience_allows(None, a)
    assert audience_allows(a, a)
    assert not audience_allows(a, b)
    # A tenant never hears an event without its id.
    assert not audience_allows(a, None)


def test_tenant_subscriptions_hear_only_their_own_tenant() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    platform, of_a, of_b = rule("*"), rule("*", tenant=a), rule("*", tenant=b)
    rules = [platform, of_a, of_b]
    assert recipients(rules, facts(tenant=a)) == [platform.id, of_a.id]
    assert recipients(rules, facts(tenant=b)) == [platform.id, of_b.id]
    assert recipients(rules, facts("node.status_changed")) == [platform.id]


def test_patterns_are_globs_on_the_type() -> None:
    assert wants(rule("node.*"), facts("node.status_changed"))
    assert wants(rule("*.no_active_nodes"), facts("deployment.no_active_nodes"))
    assert wants(rule("deployment.no_active_nodes"), facts("deployment.no_active_nodes"))
    assert not wants(rule("node.*"), facts("nodes.x"))
    assert not wants(rule("billing.payment_failed"), facts("billing.invoice_paid"))


def test_a_subscription_hears_from_its_creation_on() -> None:
    r = rule("*", created=T0)
    assert wants(r, facts(at=T0)) and wants(r, facts(at=T0 + timedelta(days=1)))
    assert not wants(r, facts(at=T0 - timedelta(microseconds=1)))


def test_an_endpoint_never_hears_of_its_own_failures() -> None:
    r = rule("notification.*")
    assert not wants(r, facts("notification.delivery_failed", about=r.id))
    assert wants(r, facts("notification.delivery_failed", about=uuid.uuid4()))


def test_facts_from_the_json_of_any_event() -> None:
    tenant, sub = uuid.uuid4(), uuid.uuid4()
    found = facts_of({"type": "notification.endpoint_disabled", "id": str(uuid.uuid4()),
                      "occurred_at": "2026-01-01T00:00:00Z", "tenant_id": str(tenant),
                      "subscription_id": str(sub)})
    assert (found.tenant_id, found.about_subscription) == (tenant, sub)
    later = facts_of({"type": "brand.new_type", "id": str(uuid.uuid4()),
                      "occurred_at": "2026-01-01T00:00:00+00:00", "tenant_id": "nonsense",
                      "subscription_id": str(sub)})
    assert later.tenant_id is None and later.about_subscription is None
    for bad in ({}, {"type": "x", "id": str(uuid.uuid4()), "occurred_at": "2026-01-01T00:00Z"},
                {"type": "a.b", "id": "nope", "occurred_at": "2026-01-01T00:00:00Z"},
                {"type": "a.b", "id": str(uuid.uuid4()), "occurred_at": "2026-01-01T00:00"},
                {"type": "a.b", "id": str(uuid.uuid4())}):
        with pytest.raises(ValueError, match="event"):
            facts_of(bad)


def test_redaction_removes_secrets_at_any_depth_and_keeps_limits() -> None:
    event = {"type": "apikey.created", "key_hash": "f" * 64, "last_four": "abcd",
             "limits": {"tokens_per_minute": 5, "webhook_token": "t"},
             "list": [{"password": "p", "ok": 1}]}
    assert redact(event) == {"type": "apikey.created", "last_four": "abcd",
                             "limits": {"tokens_per_minute": 5}, "list": [{"ok": 1}]}


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(("kind", "target"), [
    (Kind.DISCORD, "https://discord.com/api/webhooks/123456/AbC_d-e"),
    (Kind.DISCORD, "https://discordapp.com/api/v10/webhooks/1/x"),
    (Kind.SLACK, "https://hooks.slack.com/services/T000/B000/XXXX"),
    (Kind.GENERIC, "https://hooks.example.test/in?key=1"),
    (Kind.GENERIC, "http://127.0.0.1:8080/hook"),
    (Kind.EMAIL, "ops+alerts@acme.test"),
])
def test_targets_accepted(kind: Kind, target: str) -> None:
    assert check_target(kind, f" {target} ") == target


@pytest.mark.parametrize(("kind", "target", "says"), [
    (Kind.DISCORD, "https://discord.com/api/channels/1", "Discord target"),
    (Kind.DISCORD, "https://discord.com/api/webhooks/1/x?wait=true", "no query"),
    (Kind.SLACK, "https://hooks.slack.com/workflows/1", "Slack target"),
    (Kind.GENERIC, "ftp://example.test/x", "http"),
    (Kind.GENERIC, "https:///nohost", "http"),
    (Kind.GENERIC, "https://example.test/a b", "white space"),
    (Kind.GENERIC, "https://example.test:99999/", "not a valid URL"),
    (Kind.GENERIC, "https://example.test/#frag", "fragment"),
    (Kind.GENERIC, "https://example.test/" + "x" * 3000, "longer"),
    (Kind.EMAIL, "ops@", "e-mail"),
    (Kind.EMAIL, "https://example.test", "e-mail"),
])
def test_targets_refused(kind: Kind, target: str, says: str) -> None:
    with pytest.raises(TargetError, match=says):
        check_target(kind, target)


def test_masked_targets_hide_tokens() -> None:
    assert mask_target(Kind.DISCORD, "https://discord.com/api/webhooks/123/SeCrEt") == \
        "https://discord.com/api/webhooks/123/***"
    assert mask_target(Kind.SLACK, "https://hooks.slack.com/services/T1/B2/SeCrEt") == \
        "https://hooks.slack.com/services/T1/B2/***"
    assert mask_target(Kind.GENERIC, "https://user:pw@h.test:8443/in/SeCrEt?k=SeCrEt") == \
        "https://h.test:8443/***?***"
    assert mask_target(Kind.GENERIC, "https://h.test") == "https://h.test"
    assert mask_target("email", "ops@acme.test") == "o***@acme.test"


def test_signing_secrets() -> None:
    made = generate_signing_secret()
    assert made.startswith("whsec_") and len(base64.b64decode(made[6:])) == 32
    assert check_signing_secret(made) == made
    for bad, says in (("secret", "starts with"), ("whsec_!!!", "base64"),
                      ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64")):
        with pytest.raises(TargetError, match=says) as caught:
            check_signing_secret(bad)
        assert caught.value.param == "secret"


def test_the_secret_pattern_is_the_secret_check() -> None:
    """SECRET_PATTERN (the OpenAPI document's) takes what check_signing_secret takes: base64
    of 24 to 64 bytes after whsec_, padded or not."""
    pattern = re.compile(SECRET_PATTERN.replace("$", r"\Z"))  # ECMA's `$`

    def accepted(secret: str) -> bool:
        try:
            check_signing_secret(secret)
        except TargetError:
            return False
        return True

    rng = random.Random(7)
    for size in range(80):
        encoded = base64.b64encode(rng.randbytes(size)).decode()
        for secret in ("whsec_" + encoded, "whsec_" + encoded.rstrip("=")):
            assert accepted(secret) == (24 <= size <= 64) == bool(pattern.search(secret))
    for _ in range(20_000):
        secret = "whsec_" + "".join(rng.choice("AB+/=z9-_ ") for _ in range(rng.randrange(100)))
        assert accepted(secret) == bool(pattern.search(secret)), secret
        if accepted(secret):
            body = secret[6:]
            assert 24 <= len(base64.b64decode(body + "=" * (-len(body) % 4))) <= 64
    assert not accepted("") and not accepted("whsec_")


def test_the_pattern_syntax_is_the_documents() -> None:
    assert PATTERN_REGEX == "^[a-z0-9_.*?]{1,100}$"
    for refused in ("Node.*", "node:*", "node-x", "node.*\n", "a" * 101, "\x00"):
        with pytest.raises(PatternError):
            check_patterns([refused])


def test_scrub() -> None:
    url = "https://x.test/hook/t0k3n-secret"
    assert scrub(f"failed for {url} and /hook/t0k3n-secret", "/hook/t0k3n-secret", url, "") \
        == "failed for *** and ***"
    assert scrub("GET / on https://x.test/", "/", "https://x.test/") == "GET / on ***"
