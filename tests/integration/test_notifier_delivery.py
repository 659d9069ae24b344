"""The notifier against real PostgreSQL and NATS, delivering over real HTTP and SMTP to local
receivers that behave like Discord, Slack, a signed generic endpoint and a mail server.

Schedules are compressed (tens of milliseconds instead of minutes); everything else is as in
production: events published to JetStream, deliveries queued, claimed, sent and recorded.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from schemas.events import (
    ApiKeyCreated,
    DeploymentNoActiveNodes,
    Event,
    NodeStatus,
    NodeStatusChanged,
    PaymentFailed,
    TenantSuspended,
)
from services.domain.catalog import Catalog
from services.domain.notifications import Notifications
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.log_records import EventFilter
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from services.notifier.app import create_notifier_app
from services.notifier.settings import NotifierSettings
from tests.conftest import Servers
from tests.doubles.smtp_server import SmtpServer
from tests.doubles.webhook_receivers import (
    DISCORD_UNKNOWN_WEBHOOK,
    SLACK_ARCHIVED,
    SLACK_NO_SERVICE,
    Reply,
    WebhookReceivers,
    discord_rate_limited,
)
from tests.helpers import eventually

FAST = "0,0.05,0.1"


@dataclass
class RunningNotifier:
    app: web.Application
    url: str
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


AM_TOKEN = "alertmanager-test-token-5c0e9b27d4a1f863"


def notifier_settings(servers: Servers, **overrides: Any) -> NotifierSettings:
    values: dict[str, Any] = {
        "database_url": Secret(servers.database_url), "nats_url": Secret(servers.nats_url),
        "nats_creds": Secret(servers.creds(Role.NOTIFIER)), "retry_schedule": FAST,
        "poll_interval": 0.05, "event_poll_interval": 0.2,
        "min_interval_discord": 0.0, "min_interval_slack": 0.0, "min_interval_email": 0.0,
        "min_interval_generic": 0.0, "allow_private_targets": True,
        "http_timeout_seconds": 2.0, "smtp_timeout_seconds": 2.0, "lease_seconds": 5.0,
        "db_min_connections": 1, "log_json": False, "smtp_host": "127.0.0.1",
        "smtp_security": "none"}
    values.update(overrides)
    return NotifierSettings(**values)


async def start_notifier(servers: Servers, **overrides: Any) -> RunningNotifier:
    port = free_port()
    app = create_notifier_app(notifier_settings(servers, http_port=port, **overrides))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return RunningNotifier(app, f"http://127.0.0.1:{port}", runner)


@contextlib.asynccontextmanager
async def running_notifier(servers: Servers, **overrides: Any
                           ) -> AsyncIterator[RunningNotifier]:
    running = await start_notifier(servers, **overrides)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def receivers() -> AsyncIterator[WebhookReceivers]:
    found = WebhookReceivers()
    await found.start()
    yield found
    await found.stop()


@pytest.fixture
def notifications(pool: asyncpg.Pool) -> Notifications:
    return Notifications(EventLog(pool), actor="test")


@pytest.fixture
async def stack(servers: Servers, pool: asyncpg.Pool, bus: Bus) -> Servers:
    """PostgreSQL clean, NATS streams empty; each test starts its notifier(s)."""
    return servers


def node_changed(reason: str, to: NodeStatus = NodeStatus.UNHEALTHY,
                 node_id: uuid.UUID | None = None) -> NodeStatusChanged:
    return NodeStatusChanged(node_id=node_id or uuid.uuid4(), from_status=NodeStatus.ACTIVE,
                             to_status=to, reason=reason, health_score=42)


async def publish(bus: Bus, *events: Event) -> None:
    for e in events:
        await bus.publish(e)


async def logged(pool: asyncpg.Pool, pattern: str) -> list[Any]:
    page = await EventLog(pool).read_all(flt=EventFilter(types=(pattern,)))
    return [r.event for r in page.events]


async def deliveries(pool: asyncpg.Pool, subscription_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM notification_deliveries WHERE subscription_id = $1 "
        "ORDER BY event_occurred_at, event_id", subscription_id)


# --------------------------------------------------------------------------- Discord


async def test_discord_rate_limit_is_honoured_and_order_kept(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    endpoint = receivers.discord(script=[discord_rate_limited(0.3)], latency=0.02)
    sub = await notifications.create_subscription(kind="discord", target=endpoint.url,
                                                  event_types=["node.*"])
    events = [node_changed(f"check #{i}") for i in range(6)]
    async with running_notifier(stack):
        await publish(bus, *events)
        got = await endpoint.wait_for(6, delivered=True)
    first, retry = endpoint.received[0], endpoint.received[1]
    assert first.status == 429 and retry.status == 204
    # Discord's retry_after (0.3 s) was waited out, not its rounded-up header (1 s) ignored.
    assert retry.at - first.at >= 0.29
    # Event order per endpoint, one request at a time.
    assert [r.json["embeds"][0]["description"].split(": ", 1)[1] for r in got] == \
        [f"check #{i}" for i in range(6)]
    assert endpoint.max_in_flight == 1
    rows = await deliveries(pool, sub.subscription_id)
    assert [r["status"] for r in rows] == ["delivered"] * 6
    # A 429 is not a failure: the first delivery took two requests but no schedule step.
    assert (rows[0]["attempts"], rows[0]["failures"]) == (2, 0)
    outcomes = await pool.fetch(
        "SELECT outcome, status_code FROM notification_attempts WHERE delivery_id = $1 "
        "ORDER BY id", rows[0]["id"])
    assert [(o["outcome"], o["status_code"]) for o in outcomes] == \
        [("rate_limited", 429), ("delivered", 204)]


# --------------------------------------------------------------------------- Slack: gone


async def test_slack_404_and_410_disable_the_endpoint_at_once(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    no_service = receivers.slack(default=SLACK_NO_SERVICE)
    archived = receivers.slack(default=SLACK_ARCHIVED)
    healthy = receivers.slack()
    subs = [await notifications.create_subscription(kind="slack", target=e.url,
                                                    event_types=["deployment.*"])
            for e in (no_service, archived, healthy)]
    outage = [DeploymentNoActiveNodes(deployment_id=uuid.uuid4(), model_name=f"model-{i}",
                                      since=datetime.now(UTC)) for i in range(3)]
    async with running_notifier(stack):
        await publish(bus, *outage)
        await healthy.wait_for(3, delivered=True)

        async def both_disabled() -> bool:
            rows = await pool.fetch("SELECT status FROM notification_subscriptions "
                                    "WHERE id = ANY($1::uuid[])",
                                    [s.subscription_id for s in subs[:2]])
            return all(r["status"] == "disabled" for r in rows)

        await eventually(both_disabled, what="gone endpoints disabled")
        later = DeploymentNoActiveNodes(deployment_id=uuid.uuid4(), model_name="later",
                                        since=datetime.now(UTC))
        await publish(bus, later)
        await healthy.wait_for(4, delivered=True)
    # One request each, never another: a webhook that is gone is not called again.
    assert [r.status for r in no_service.received] == [404]
    assert [r.status for r in archived.received] == [410]
    for sub, code in zip(subs[:2], (404, 410), strict=True):
        rows = await deliveries(pool, sub.subscription_id)
        assert [r["status"] for r in rows] == ["failed", "cancelled", "cancelled"]
        reason = await pool.fetchval(
            "SELECT status_reason FROM notification_subscriptions WHERE id = $1",
            sub.subscription_id)
        assert str(code) in reason
    disabled = await logged(pool, "notification.endpoint_disabled")
    assert sorted(e.last_status_code for e in disabled) == [404, 410]
    assert {e.subscription_id for e in disabled} == {s.subscription_id for s in subs[:2]}
    # Slack's blocks were within limits (the receiver would have answered 400).
    body = healthy.received[0].json
    assert body["blocks"][0]["type"] == "header"
    assert "model-0" in body["text"]


async def test_discord_unknown_webhook_is_never_used_again(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    deleted = receivers.discord(default=DISCORD_UNKNOWN_WEBHOOK)
    sub = await notifications.create_subscription(kind="discord", target=deleted.url,
                                                  event_types=["node.status_changed"])
    async with running_notifier(stack):
        await publish(bus, node_changed("one"), node_changed("two"))

        async def disabled() -> bool:
            return await pool.fetchval(
                "SELECT status FROM notification_subscriptions WHERE id = $1",
                sub.subscription_id) == "disabled"

        await eventually(disabled, what="webhook disabled")
    assert len(deleted.received) == 1


# --------------------------------------------------------------------------- generic, signed


async def test_generic_is_signed_and_retried_on_the_schedule(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    from services.domain.notifications.targets import generate_signing_secret

    secret = generate_signing_secret()
    endpoint = receivers.generic(secret, script=[Reply(500, "boom"), Reply(503)])
    sub = await notifications.create_subscription(kind="generic", target=endpoint.url,
                                                  event_types=["billing.payment_failed"],
                                                  signing_secret=secret)
    tenant = uuid.uuid4()
    event = PaymentFailed(tenant_id=tenant, invoice_id="in_123", amount_due=4200,
                          currency="usd", stripe_event_id="evt_1")
    async with running_notifier(stack, retry_schedule="0,0.2,0.4"):
        await publish(bus, event)
        got = await endpoint.wait_for(3)
    assert [r.status for r in got] == [500, 503, 200]  # every one verified (else 401)
    assert got[1].at - got[0].at >= 0.19
    assert got[2].at - got[1].at >= 0.39
    assert {r.headers["webhook-id"] for r in got} == {str(event.id)}
    body = got[2].json
    assert body["type"] == "billing.payment_failed"
    assert body["data"]["invoice_id"] == "in_123"
    assert body["data"]["tenant_id"] == str(tenant)
    (row,) = await deliveries(pool, sub.subscription_id)
    assert (row["status"], row["attempts"], row["failures"]) == ("delivered", 3, 2)
    log = await pool.fetch("SELECT * FROM notification_attempts WHERE delivery_id = $1 "
                           "ORDER BY id", row["id"])
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in log] == \
        [(1, "failed", 500), (2, "failed", 503), (3, "delivered", 200)]
    assert log[0]["response_excerpt"] == "boom"
    assert all(a["latency_ms"] > 0 for a in log)


async def test_exhausted_delivery_is_reported_and_can_be_replayed(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    from services.domain.notifications.targets import generate_signing_secret

    endpoint = receivers.generic(generate_signing_secret())  # not the subscription's secret
    sub = await notifications.create_subscription(kind="generic", target=endpoint.url,
                                                  event_types=["tenant.*"])
    assert sub.signing_secret is not None and sub.signing_secret.startswith("whsec_")
    event = TenantSuspended(tenant_id=uuid.uuid4(), reason="unpaid")
    async with running_notifier(stack):
        await publish(bus, event)
        await endpoint.wait_for(3)

        async def reported() -> list[Any]:
            return await logged(pool, "notification.delivery_failed")

        (failed,) = await eventually(reported, what="delivery_failed event")
        assert [r.status for r in endpoint.received] == [401, 401, 401]
        (row,) = await deliveries(pool, sub.subscription_id)
        assert row["status"] == "failed"
        assert (failed.subscription_id, failed.event_id, failed.delivery_id) == \
            (sub.subscription_id, event.id, row["id"])
        assert (failed.attempts, failed.last_status_code, failed.event_type) == \
            (3, 401, "tenant.suspended")
        # The receiver learns the right secret; an operator replays the delivery.
        endpoint.secret = sub.signing_secret
        await notifications.replay_delivery(sub.subscription_id, row["id"])
        await endpoint.wait_for(1, delivered=True)
    (row,) = await deliveries(pool, sub.subscription_id)
    assert (row["status"], row["attempts"]) == ("delivered", 4)


async def test_an_endpoint_failing_for_too_long_is_disabled(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    endpoint = receivers.slack(default=Reply(500, "internal_error"))
    sub = await notifications.create_subscription(kind="slack", target=endpoint.url,
                                                  event_types=["node.*"])
    async with running_notifier(stack, retry_schedule=",".join(["0"] + ["0.05"] * 30),
                                disable_after_seconds=0.25):
        await publish(bus, node_changed("flapping"), node_changed("again"))

        async def disabled() -> list[Any]:
            return await logged(pool, "notification.endpoint_disabled")

        (event,) = await eventually(disabled, what="endpoint disabled")
    assert event.subscription_id == sub.subscription_id
    assert "failing without a success" in event.reason
    assert event.last_status_code == 500
    assert 3 <= len(endpoint.received) < 31
    assert [r["status"] for r in await deliveries(pool, sub.subscription_id)] == \
        ["failed", "cancelled"]
    # Disabling says it all: no delivery_failed on top.
    assert await logged(pool, "notification.delivery_failed") == []


# --------------------------------------------------------------------------- e-mail


async def test_email_over_smtp_with_text_and_html(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, notifications: Notifications) -> None:
    smtp = SmtpServer()
    smtp.handler.refused.add("nobody@acme.test")
    await smtp.start()
    try:
        ops = await notifications.create_subscription(kind="email", target="ops@acme.test",
                                                      event_types=["deployment.*"])
        nobody = await notifications.create_subscription(
            kind="email", target="nobody@acme.test", event_types=["deployment.*"])
        outage = DeploymentNoActiveNodes(deployment_id=uuid.uuid4(),
                                         model_name="llama-<8b>&co",
                                         since=datetime.now(UTC) - timedelta(minutes=3))
        async with running_notifier(stack, smtp_port=smtp.port):
            await publish(bus, outage)
            (mail,) = await smtp.handler.wait_for(1)

            async def refused_disabled() -> bool:
                return await pool.fetchval(
                    "SELECT status FROM notification_subscriptions WHERE id = $1",
                    nobody.subscription_id) == "disabled"

            await eventually(refused_disabled, what="refused mailbox disabled")
    finally:
        await smtp.stop()
    assert mail["To"] == "ops@acme.test"
    assert mail["Subject"] == "[CrossLogic] No active nodes for llama-<8b>&co"
    assert str(outage.id) in mail["Message-ID"] and str(ops.subscription_id) in mail["Message-ID"]
    text = mail.get_body(preferencelist=("plain",))
    html = mail.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert "llama-<8b>&co" in text.get_content()
    assert "llama-&lt;8b&gt;&amp;co" in html.get_content()  # escaped, not markup
    (row,) = await deliveries(pool, ops.subscription_id)
    assert (row["status"], row["last_status_code"]) == ("delivered", 250)
    (refused,) = await deliveries(pool, nobody.subscription_id)
    assert (refused["status"], refused["last_status_code"]) == ("failed", 550)
    # The server's refusal quotes the mailbox; what is kept does not.
    assert "recipient refused" in refused["last_error"]
    errors = await pool.fetch("SELECT error FROM notification_attempts WHERE delivery_id = $1",
                              refused["id"])
    kept = [refused["last_error"], *(e["error"] for e in errors)]
    assert all("nobody@acme.test" not in text and "***" in text for text in kept), kept


# --------------------------------------------------------------------------- tenants


async def test_a_tenant_only_ever_receives_its_own_events(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    from services.domain.notifications.targets import generate_signing_secret

    catalog = Catalog(EventLog(pool))
    tenant_a = await catalog.create_tenant("a")
    tenant_b = await catalog.create_tenant("b")
    endpoints, subs = {}, {}
    for name, tenant, patterns in (("a", tenant_a, ["*"]), ("b", tenant_b, ["*"]),
                                   ("ops", None, ["billing.*", "node.*"])):
        secret = generate_signing_secret()
        endpoints[name] = receivers.generic(secret)
        subs[name] = await notifications.create_subscription(
            kind="generic", target=endpoints[name].url, event_types=patterns,
            tenant_id=tenant, signing_secret=secret)
    paid = PaymentFailed(tenant_id=tenant_a, invoice_id="in_a", amount_due=100,
                         currency="eur", stripe_event_id="evt_a")
    key = ApiKeyCreated(key_id=uuid.uuid4(), tenant_id=tenant_a, environment_id=uuid.uuid4(),
                        key_hash="f" * 64, last_four="abcd")
    suspended = TenantSuspended(tenant_id=tenant_b, reason="abuse")
    node = node_changed("platform only")
    async with running_notifier(stack):
        await publish(bus, paid, key, suspended, node)
        got_a = await endpoints["a"].wait_for(2, delivered=True)
        got_b = await endpoints["b"].wait_for(1, delivered=True)
        got_ops = await endpoints["ops"].wait_for(2, delivered=True)
    assert [r.json["type"] for r in got_a] == ["billing.payment_failed", "apikey.created"]
    assert [r.json["type"] for r in got_b] == ["tenant.suspended"]
    assert sorted(r.json["type"] for r in got_ops) == ["billing.payment_failed",
                                                        "node.status_changed"]
    # Everything intake will ever queue for these events is queued (each endpoint heard the
    # last event of each stream): nothing else went to anyone.
    for name, expected in (("a", 2), ("b", 1), ("ops", 2)):
        assert len(await deliveries(pool, subs[name].subscription_id)) == expected
    # An API key's hash is not for webhooks.
    assert "key_hash" not in got_a[1].json["data"]
    assert got_a[1].json["data"]["last_four"] == "abcd"


# --------------------------------------------------------------------------- restarts


async def drained(bus: Bus) -> None:
    async def done() -> bool:
        for stream, durable in (("NODES", "notifier-nodes"), ("CONTROL", "notifier-control")):
            info = await bus.js.consumer_info(stream, durable)
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    await eventually(done, what="notifier consumers drained")


async def test_no_duplicate_delivery_after_a_restart_that_rereads_the_streams(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    endpoint = receivers.discord()
    sub = await notifications.create_subscription(kind="discord", target=endpoint.url,
                                                  event_types=["node.*", "tenant.*"])
    first = [node_changed(f"first #{i}") for i in range(3)]
    async with running_notifier(stack):
        await publish(bus, *first, TenantSuspended(tenant_id=uuid.uuid4()))
        await endpoint.wait_for(4, delivered=True)
    # The consumers lose their place: the next notifiers read both streams from the start.
    await bus.js.delete_consumer("NODES", "notifier-nodes")
    await bus.js.delete_consumer("CONTROL", "notifier-control")
    later = [node_changed(f"later #{i}") for i in range(2)]
    async with running_notifier(stack), running_notifier(stack):  # two replicas
        await publish(bus, *later)
        await endpoint.wait_for(6, delivered=True)
        await drained(bus)
    assert len(endpoint.received) == 6
    descriptions = [r.json["embeds"][0].get("description", "") for r in endpoint.received]
    assert len(set(descriptions)) == 6
    assert len(await deliveries(pool, sub.subscription_id)) == 6


# --------------------------------------------------------------------------- safety


async def test_private_addresses_are_refused_unless_allowed(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    endpoint = receivers.slack()
    sub = await notifications.create_subscription(kind="slack", target=endpoint.url,
                                                  event_types=["node.*"])
    async with running_notifier(stack, allow_private_targets=False, retry_schedule="0"):
        await publish(bus, node_changed("internal"))

        async def attempted() -> list[asyncpg.Record]:
            return await pool.fetch("SELECT * FROM notification_attempts "
                                    "WHERE subscription_id = $1", sub.subscription_id)

        (attempt,) = await eventually(attempted, what="an attempt")
    assert attempt["outcome"] == "refused"
    assert "127.0.0.1 is not a public address" in attempt["error"]
    assert endpoint.received == []
    # The token in the URL never shows in what the notifier keeps.
    assert "tok-slack" not in attempt["error"]


async def test_alertmanager_token_and_payload_checks(stack: Servers) -> None:
    async with running_notifier(stack, alertmanager_token=Secret(AM_TOKEN)) as notifier, \
            aiohttp.ClientSession() as http:
        url = notifier.url + "/alertmanager"
        async with http.post(url, json={"version": "4"}) as r:
            assert r.status == 401
        async with http.post(url, json={"version": "4"},
                             headers={"Authorization": f"Bearer {AM_TOKEN[:-1]}"}) as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {AM_TOKEN}"}
        async with http.post(url, json={"version": "3", "status": "firing", "alerts": []},
                             headers=headers) as r:
            assert r.status == 400
            assert "version" in (await r.json())["error"]["message"]
        async with http.post(url, data=b"nope", headers=headers) as r:
            assert r.status == 400


# --------------------------------------------------------------------------- Alertmanager


def alertmanager_payload(n: int, *, status: str = "firing", long: int = 0) -> dict[str, Any]:
    """Alertmanager's webhook payload, version 4, for the reference's alert rules."""
    starts = "2026-01-01T12:00:00.123456789Z"
    alerts = [{
        "status": status,
        "labels": {"alertname": "NodeUnhealthy", "severity": "critical",
                   "node": f"node-{i}", "instance": f"10.0.1.{i}:8000"},
        "annotations": {"summary": f"Node node-{i} health score below 50",
                        "description": "x" * long or "node_health_score < 50 for 2m"},
        "startsAt": starts, "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": f"http://prometheus:9090/graph?g0.expr=node_health_score{i}",
        "fingerprint": f"{i:016x}"} for i in range(n)]
    return {"version": "4", "groupKey": '{}:{alertname="NodeUnhealthy"}',
            "truncatedAlerts": 0, "status": status, "receiver": "crosslogic",
            "groupLabels": {"alertname": "NodeUnhealthy"},
            "commonLabels": {"alertname": "NodeUnhealthy", "severity": "critical"},
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
            "alerts": alerts}


async def test_alertmanager_payload_fans_out_to_platform_subscriptions_within_limits(
        stack: Servers, bus: Bus, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    from services.domain.notifications.targets import generate_signing_secret

    tenant = await Catalog(EventLog(pool)).create_tenant("acme")
    discord_ep = receivers.discord()
    slack_ep = receivers.slack()
    tenant_secret = generate_signing_secret()
    tenant_ep = receivers.generic(tenant_secret)
    await notifications.create_subscription(kind="discord", target=discord_ep.url,
                                            event_types=["notification.alert"])
    await notifications.create_subscription(kind="slack", target=slack_ep.url,
                                            event_types=["notification.*"])
    await notifications.create_subscription(kind="generic", target=tenant_ep.url,
                                            event_types=["*"], tenant_id=tenant,
                                            signing_secret=tenant_secret)
    async with running_notifier(stack) as notifier, aiohttp.ClientSession() as http:
        # Twelve alerts, each with a 3,000-character description: far past Discord's limits.
        async with http.post(notifier.url + "/alertmanager",
                             json=alertmanager_payload(12, long=3000)) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert (answer["alerts"], answer["deliveries"]) == (12, 2)
        (to_discord,) = await discord_ep.wait_for(1)
        (to_slack,) = await slack_ep.wait_for(1)
        # The relay publishes the logged alert later; meeting it again sends nothing more.
        (alert,) = await logged(pool, "notification.alert")
        await publish(bus, alert)
        await drained(bus)
    assert to_discord.status == 204 and to_slack.status == 200  # no limit broken
    message = to_discord.json
    assert message["content"].startswith("[FIRING:12] NodeUnhealthy")
    assert len(message["embeds"]) <= 10 and "more not shown" in message["content"]
    assert sum(len(e.get("description", "")) for e in message["embeds"]) < 6000
    assert message["embeds"][0]["title"] == "[FIRING] NodeUnhealthy"
    assert message["embeds"][0]["url"].startswith("http://prometheus:9090/graph")
    assert message["allowed_mentions"] == {"parse": []}
    # Slack takes 50 blocks: all twelve alerts fit, each cut to a section's 3,000.
    sections = [b for b in to_slack.json["blocks"] if b["type"] == "section" and "text" in b]
    assert len(sections) == 12 and all(len(b["text"]["text"]) <= 3000 for b in sections)
    assert tenant_ep.received == []  # alerts are the platform's
    assert len(discord_ep.received) == 1 and len(slack_ep.received) == 1
    assert alert.group_id and alert.alerts[0].ends_at is None
    assert alert.alerts[0].labels["node"] == "node-0"


async def test_a_delivery_queued_for_a_disabled_subscription_is_never_sent(
        stack: Servers, pool: asyncpg.Pool, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    endpoint = receivers.slack()
    sub = await notifications.create_subscription(kind="slack", target=endpoint.url,
                                                  event_types=["node.*"])
    await notifications.disable_endpoint(sub.subscription_id, "operator test")
    # As an intake that read the subscription a moment before it was disabled would have.
    event = node_changed("raced")
    await pool.execute(
        """INSERT INTO notification_deliveries (id, subscription_id, event_id, event_type,
               event_occurred_at, event, status, next_attempt_at)
           VALUES ($1, $2, $3, $4, $5, '{}', 'pending', now())""",
        uuid.uuid4(), sub.subscription_id, event.id, event.type, event.occurred_at)
    async with running_notifier(stack):
        async def cancelled() -> bool:
            rows = await deliveries(pool, sub.subscription_id)
            return rows[0]["status"] == "cancelled"

        await eventually(cancelled, what="stale delivery cancelled")
    assert endpoint.received == []


async def test_each_endpoint_is_paced_at_its_kind_s_rate(
        stack: Servers, bus: Bus, receivers: WebhookReceivers,
        notifications: Notifications) -> None:
    slack_ep = receivers.slack()
    other = receivers.slack()
    for endpoint in (slack_ep, other):
        await notifications.create_subscription(kind="slack", target=endpoint.url,
                                                event_types=["node.*"])
    async with running_notifier(stack, min_interval_slack=0.2):
        await publish(bus, *(node_changed(f"#{i}") for i in range(3)))
        got = await slack_ep.wait_for(3)
        await other.wait_for(3)
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert all(gap >= 0.19 for gap in gaps), gaps
    # Endpoints are paced apart: the other one was not held back behind this one.
    assert abs(other.received[0].at - slack_ep.received[0].at) < 0.15
