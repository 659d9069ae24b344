"""Subscriptions through the admin API and `crosslogic subscriptions`, with the notifier
delivering behind them: make, read, list, delete, the delivery log, replays; and what never
shows (a webhook's token, a signing secret after its creation)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas.events import NodeStatus
from services.infra.bus import Bus
from services.infra.natsauth.identities import Role
from tests.conftest import Servers
from tests.doubles.webhook_receivers import Reply, WebhookReceivers
from tests.helpers import eventually
from tests.integration.test_admin_api import TOKEN, Admin, assert_error, running_admin
from tests.integration.test_cli_admin import Cli, base_env
from tests.integration.test_notifier_delivery import node_changed, publish, running_notifier


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str,
                redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as running:
        yield running


@pytest.fixture
async def receivers() -> AsyncIterator[WebhookReceivers]:
    found = WebhookReceivers()
    await found.start()
    yield found
    await found.stop()


async def test_subscriptions_are_made_read_listed_and_deleted(
        admin: Admin, pool: asyncpg.Pool, receivers: WebhookReceivers) -> None:
    tenant = await admin.ok("POST", "/tenants", {"name": "Acme"}, 201)
    discord = receivers.discord()
    platform = await admin.ok("POST", "/subscriptions", {
        "kind": "discord", "target": discord.url, "event_types": ["node.*", "deployment.*"],
        "description": "ops channel"}, 201)
    assert platform["tenant_id"] is None and platform["status"] == "active"
    assert platform["signing_secret"] is None
    token = discord.url.rsplit("/", 1)[1]
    assert platform["target"].endswith("/api/webhooks/1001/***") and token not in platform["target"]

    hook = await admin.ok("POST", "/subscriptions", {
        "kind": "generic", "target": "https://hooks.acme.test/crosslogic?key=s3cr3t",
        "event_types": ["billing.*"], "tenant_id": tenant["id"]}, 201)
    secret = hook["signing_secret"]
    assert secret.startswith("whsec_") and hook["tenant_id"] == tenant["id"]
    assert hook["target"] == "https://hooks.acme.test/***?***"

    # The secret was shown once; reads never hold it, nor the token of a URL.
    got = await admin.ok("GET", f"/subscriptions/{hook['id']}")
    assert "signing_secret" not in got
    assert got == {k: v for k, v in hook.items() if k != "signing_secret"}
    raw = await pool.fetchval("SELECT string_agg(data::text, ' ') FROM events")
    assert token not in raw and "s3cr3t" not in raw and secret not in raw
    created = await pool.fetch("SELECT type, metadata FROM events "
                               "WHERE type = 'notification.subscription_created'")
    assert len(created) == 2 and all(r["metadata"]["actor"] == "admin-api" for r in created)

    first = await admin.ok("GET", "/subscriptions", params={"limit": "1"})
    assert [s["id"] for s in first["data"]] == [platform["id"]] and first["next_cursor"]
    second = await admin.ok("GET", "/subscriptions",
                            params={"limit": "1", "cursor": first["next_cursor"]})
    assert [s["id"] for s in second["data"]] == [hook["id"]] and second["next_cursor"] is None
    mine = await admin.ok("GET", "/subscriptions", params={"tenant_id": tenant["id"]})
    assert [s["id"] for s in mine["data"]] == [hook["id"]]
    ops = await admin.ok("GET", "/subscriptions", params={"scope": "platform"})
    assert [s["id"] for s in ops["data"]] == [platform["id"]]

    await admin.ok("DELETE", f"/subscriptions/{hook['id']}", status=204)
    await admin.ok("DELETE", f"/subscriptions/{hook['id']}", status=204)  # idempotent
    assert (await admin.ok("GET", f"/subscriptions/{hook['id']}"))["status"] == "deleted"
    left = await admin.ok("GET", "/subscriptions")
    assert [s["id"] for s in left["data"]] == [platform["id"]]
    assert await pool.fetchval("SELECT count(*) FROM events "
                               "WHERE type = 'notification.subscription_deleted'") == 1


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"kind": "slack", "target": "https://discord.com/api/webhooks/1/x",
      "event_types": ["node.*"]}, "target", "Slack target"),
    ({"kind": "discord", "target": "ftp://discord.com/api/webhooks/1/x",
      "event_types": ["node.*"]}, "target", "http(s) URL"),
    ({"kind": "email", "target": "not-an-address", "event_types": ["node.*"]}, "target",
     "e-mail address"),
    ({"kind": "discord", "target": "https://discord.com/api/webhooks/1/x",
      "event_types": ["node.*", "node.heartbeat"]}, "event_types[1]", "heartbeats"),
    ({"kind": "discord", "target": "https://discord.com/api/webhooks/1/x",
      "event_types": ["usage.*"]}, "event_types[0]", "usage events are not delivered"),
    ({"kind": "discord", "target": "https://discord.com/api/webhooks/1/x",
      "event_types": ["Node.*"]}, "event_types[0]", "not an event type pattern"),
    ({"kind": "slack", "target": "https://hooks.slack.com/services/T/B/x",
      "event_types": ["node.*"], "secret": "whsec_" + "A" * 40}, "secret",
     "Unknown field 'secret'"),
    ({"kind": "generic", "target": "https://example.test/hook", "event_types": ["node.*"],
      "secret": "plain"}, "secret", "whsec_"),
    # Absent or null makes a secret; an empty one is not a secret.
    ({"kind": "generic", "target": "https://example.test/hook", "event_types": ["node.*"],
      "secret": ""}, "secret", "whsec_"),
    ({"kind": "generic", "target": "https://example.test/ho\x1fok", "event_types": ["node.*"]},
     "target", "white space"),
    ({"kind": "pager", "target": "https://example.test/hook", "event_types": ["node.*"]},
     "kind", None),
    ({"kind": "generic", "target": "https://example.test/hook", "event_types": []},
     "event_types", None),
    ({"kind": "generic", "target": "https://example.test/hook", "event_types": ["a.b"],
      "colour": "red"}, "colour", "Unknown field"),
])
async def test_bad_subscriptions_are_refused_with_the_field(
        admin: Admin, body: dict[str, Any], param: str, says: str | None) -> None:
    status, answer = await admin.call("POST", "/subscriptions", body)
    assert status == 400, answer
    message = assert_error(answer, "invalid_request_error", param)
    if says is not None:
        assert says in message


async def test_unknown_things_are_404(admin: Admin) -> None:
    status, answer = await admin.call("POST", "/subscriptions", {
        "kind": "email", "target": "ops@acme.test", "event_types": ["tenant.*"],
        "tenant_id": str(uuid.uuid4())})
    assert status == 404 and answer["error"]["code"] == "tenant_not_found"
    missing = uuid.uuid4()
    for path in (f"/subscriptions/{missing}", f"/subscriptions/{missing}/deliveries",
                 f"/subscriptions/{missing}/attempts",
                 f"/subscriptions/{missing}/deliveries/{uuid.uuid4()}"):
        status, answer = await admin.call("GET", path)
        assert status == 404, path
    status, answer = await admin.call("GET", "/subscriptions", params={"scope": "everyone"})
    assert status == 400 and answer["error"]["param"] == "scope"
    status, answer = await admin.call("GET", "/subscriptions/not-a-uuid")
    assert status == 400 and answer["error"]["param"] == "subscription_id"


async def test_delivery_log_and_replay_through_the_api(
        admin: Admin, servers: Servers, bus: Bus, pool: asyncpg.Pool,
        receivers: WebhookReceivers) -> None:
    slack = receivers.slack(script=[Reply(500, "oops")] * 2)
    sub = await admin.ok("POST", "/subscriptions", {
        "kind": "slack", "target": slack.url, "event_types": ["node.status_changed"]}, 201)
    path = f"/subscriptions/{sub['id']}"
    async with running_notifier(servers, retry_schedule="0,0.05"):
        await publish(bus, node_changed("down", NodeStatus.STALE))

        async def failed() -> list[Any]:
            page = await admin.ok("GET", f"{path}/deliveries", params={"status": "failed"})
            return list(page["data"])

        (delivery,) = await eventually(failed, what="a failed delivery")
        assert (delivery["attempts"], delivery["last_status_code"]) == (2, 500)
        assert delivery["next_attempt_at"] is None and delivery["event_type"] == \
            "node.status_changed"
        detail = await admin.ok("GET", f"{path}/deliveries/{delivery['id']}")
        assert detail["event"]["to_status"] == "stale"
        assert [(a["attempt"], a["outcome"], a["status_code"], a["response_excerpt"])
                for a in detail["attempt_log"]] == [(1, "failed", 500, "oops"),
                                                    (2, "failed", 500, "oops")]

        replayed = await admin.ok("POST", f"{path}/deliveries/{delivery['id']}/replay",
                                  status=202)
        assert replayed["status"] == "pending"
        await slack.wait_for(1, delivered=True)

        async def delivered() -> dict[str, Any] | None:
            found = await admin.ok("GET", f"{path}/deliveries/{delivery['id']}")
            return found if found["status"] == "delivered" else None

        done = await eventually(delivered, what="replay delivered")
        assert done["attempts"] == 3 and done["delivered_at"]
        # A delivered delivery is not replayed.
        status, answer = await admin.call("POST",
                                          f"{path}/deliveries/{delivery['id']}/replay")
        assert status == 409 and "only failed or cancelled" in answer["error"]["message"]
    log = await admin.ok("GET", f"{path}/attempts", params={"limit": "2"})
    assert [a["outcome"] for a in log["data"]] == ["delivered", "failed"]  # newest first
    rest = await admin.ok("GET", f"{path}/attempts", params={"cursor": log["next_cursor"]})
    assert [a["outcome"] for a in rest["data"]] == ["failed"]
    assert (await admin.ok("GET", path))["last_success_at"]


async def test_crosslogic_subscriptions(admin: Admin, tmp_path: Path, pool: asyncpg.Pool
                                        ) -> None:
    cli = Cli({**base_env(tmp_path), "CROSSLOGIC_ADMIN_URL": admin.url,
               "CROSSLOGIC_ADMIN_TOKEN": TOKEN})
    hook = await cli.json("subscriptions", "create", "generic",
                          "https://hooks.example.test/in", "--event", "node.*",
                          "--event", "deployment.no_active_nodes", "--description", "pager")
    assert hook["signing_secret"].startswith("whsec_")
    assert hook["event_types"] == ["node.*", "deployment.no_active_nodes"]
    listed = await cli.ok("subscriptions", "list", "--platform")
    header, row = listed.splitlines()
    assert header.split()[:3] == ["ID", "KIND", "TARGET"]
    assert hook["id"] in row and "https://hooks.example.test/***" in row
    assert await cli.ok("subscriptions", "deliveries", hook["id"]) == "(none)\n"
    assert json.loads(await cli.ok("subscriptions", "deliveries", hook["id"], "--attempts",
                                   "--json")) == []
    code, _, err = await cli.run("subscriptions", "create", "discord",
                                 "https://discord.com/api/webhooks/1/x", "--event",
                                 "node.heartbeat")
    assert code == 1 and "heartbeats" in err and "event_types[0]" in err
    assert "deleted subscription" in await cli.ok("subscriptions", "delete", hook["id"])
    shown = await cli.ok("subscriptions", "get", hook["id"])
    assert any(line.split() == ["status", "deleted"] for line in shown.splitlines())
