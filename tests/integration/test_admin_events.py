"""The admin API's event log routes: history pages, the live SSE stream, stats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from services.admin.bodies import EventList
from services.cli.tail import format_json
from services.infra.eventlog import EventLog
from services.infra.log_records import START, EventFilter
from services.infra.natsauth.identities import Role
from tests.conftest import Servers
from tests.helpers import node_registered, tenant_created
from tests.integration.test_admin_api import TOKEN, Admin, assert_error, running_admin


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str,
                redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API),
                             event_stream_keepalive=0.3) as running:
        yield running


async def append_some(pool: asyncpg.Pool) -> list[Any]:
    log = EventLog(pool)
    made = [tenant_created("a"), node_registered(), tenant_created("b"), node_registered()]
    for e in made:
        await log.append(e.stream, [e])
    return made


async def test_history_filters_and_pages(admin: Admin, pool: asyncpg.Pool) -> None:
    made = await append_some(pool)
    everything = await admin.ok("GET", "/events")
    # Documented shape: the body decodes as the type the OpenAPI document is built from.
    msgspec.json.decode(json.dumps(everything).encode(), type=EventList)
    assert [e["event"]["id"] for e in everything["data"]] == [str(e.id) for e in made]
    assert everything["next_cursor"] is None
    # The same object `crosslogic events tail --json` prints.
    page = await EventLog(pool).read_all(START, 10, EventFilter())
    assert everything["data"] == [json.loads(format_json(e)) for e in page.events]

    nodes = await admin.ok("GET", "/events", params={"type": "node.*"})
    assert [e["event"]["type"] for e in nodes["data"]] == ["node.registered"] * 2
    both = await admin.ok("GET", "/events", params=[("type", "node.*"),
                                                     ("type", "tenant.created")])
    assert len(both["data"]) == 4
    one_stream = await admin.ok("GET", "/events", params={"stream": made[2].stream})
    assert [e["event"]["id"] for e in one_stream["data"]] == [str(made[2].id)]
    assert len((await admin.ok("GET", "/events", params={"since": "10m"}))["data"]) == 4
    assert (await admin.ok("GET", "/events", params={"since": "2999-01-01T00:00:00Z"})
            )["data"] == []
    from_three = await admin.ok("GET", "/events", params={"from": "3"})
    assert [e["position"] for e in from_three["data"]] == [3, 4]

    first = await admin.ok("GET", "/events", params={"type": "tenant.*", "limit": "1"})
    assert [e["event"]["id"] for e in first["data"]] == [str(made[0].id)]
    rest = await admin.ok("GET", "/events", params={"type": "tenant.*",
                                                    "cursor": first["next_cursor"]})
    assert [e["event"]["id"] for e in rest["data"]] == [str(made[2].id)]
    assert rest["next_cursor"] is None

    for params, param in (({"since": "yesterday"}, "since"), ({"from": "x"}, "from"),
                          ({"from": "-1"}, "from"), ({"cursor": "nope"}, "cursor"),
                          ({"limit": "1001"}, "limit"), ({"typ": "node.*"}, "typ"),
                          ({"type": "node.*;drop"}, "type"), ({"stream": ""}, "stream")):
        status, answer = await admin.call("GET", "/events", params=params)
        assert status == 400, (params, answer)
        assert_error(answer, "invalid_request_error", param)


async def read_sse(response: aiohttp.ClientResponse, deadline: float = 10) -> dict[str, str]:
    """The next event of an SSE stream (comments skipped), with a deadline."""
    fields: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(response.content.readline(), deadline)).decode()
        if line in ("\n", "\r\n"):
            if fields:
                return fields
            continue
        assert line, "the stream ended"
        if line.startswith(":"):
            continue
        name, _, value = line.rstrip("\n").partition(": ")
        fields[name] = value


async def test_stream_sends_history_then_live(admin: Admin, pool: asyncpg.Pool) -> None:
    before = tenant_created("before")
    log = EventLog(pool)
    await log.append(before.stream, [before])
    url = admin.server.make_url("/admin/v1/events/stream")
    headers = {"X-Admin-Token": TOKEN}
    async with admin.session.get(url, params={"type": "tenant.*"}, headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        first = await read_sse(r)
        assert json.loads(first["data"])["event"]["id"] == str(before.id)
        # Appended after the stream caught up: arrives live; other types are filtered out.
        await log.append((n := node_registered()).stream, [n])
        created = await admin.ok("POST", "/tenants", {"name": "live"}, 201)
        live = await read_sse(r)
        record = json.loads(live["data"])
        assert record["event"]["tenant_id"] == created["id"]
        assert record["event"]["type"] == "tenant.created"
        assert record["event"]["metadata"]["actor"] == "admin-api"
        # The log is quiet now: keep-alive comments flow.
        assert await asyncio.wait_for(r.content.readline(), 5) == b": keep-alive\n"

    # Reconnecting with Last-Event-ID resumes after that event.
    async with admin.session.get(url, params={"type": "tenant.*"},
                                 headers={**headers, "Last-Event-ID": first["id"]}) as r:
        resumed = await read_sse(r)
        assert json.loads(resumed["data"])["event"]["tenant_id"] == created["id"]

    status, answer = await admin.call("GET", "/events/stream", params={"limit": "5"})
    assert status == 400
    assert_error(answer, "invalid_request_error", "limit")
    status, answer = await admin.call("GET", "/events/stream", token=None)
    assert status == 401


async def test_stats(admin: Admin, pool: asyncpg.Pool) -> None:
    await append_some(pool)
    stats = await admin.ok("GET", "/events/stats")
    counts = {s["type"]: s["events"] for s in stats["data"]}
    assert counts == {"tenant.created": 2, "node.registered": 2}
    assert {s["last_position"] for s in stats["data"]} == {3, 4}
    await admin.ok("POST", "/tenants", {"name": "more"}, 201)
    again = await admin.ok("GET", "/events/stats")
    assert {s["type"]: s["events"] for s in again["data"]}["tenant.created"] == 3
