"""What a stolen credential can do on NATS: a GPU node's, a service's. Each attempt against the
real server, each refused, and nothing of it stored anywhere."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from decimal import Decimal

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy

from schemas.events import ApiKeyCreated, NodeRegistered, UsagePrice, UsageRecorded
from schemas.subjects import CONTROL, NODES, NODES_VIEW, USAGE
from services.infra.aio import stop_task
from services.infra.bus import Bus
from services.infra.natsauth.authority import Authority
from services.infra.natsauth.identities import NODE_PUBLISHES, Role
from services.infra.natsauth.keys import KeyKind, new_seed
from tests.conftest import Servers
from tests.helpers import eventually, node_registered
from tests.redteam.conftest import Connect


def forged_usage(tenant: uuid.UUID) -> bytes:
    event = UsageRecorded(request_id="forged", tenant_id=tenant, environment_id=tenant,
                          api_key_id=tenant, model="m", endpoint="chat", region="us-east-1",
                          node_id=None, prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                          price=UsagePrice(input_price_per_million=Decimal("-1000"),
                                           output_price_per_million=Decimal("-1000"),
                                           region_multiplier=Decimal("1"),
                                           cost=Decimal("-1000000")))
    return msgspec.json.encode(event)


async def messages(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


async def test_a_node_credential_publishes_nothing_but_its_own_words(
        servers: Servers, bus: Bus, intruder: Connect) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    node = await intruder(servers.node_creds(me))
    tenant = uuid.uuid4()
    # Bill a tenant, negative included.
    await node.publish_refused(f"usage.recorded.{tenant}", forged_usage(tenant))
    # Be another node: register in its name, point its traffic elsewhere, drain it.
    hijack = NodeRegistered(node_id=other, cluster_name="c", provider="aws", region="r",
                            instance_type="i", gpu_type="g", vram_total_gb=1, model_name="m",
                            endpoint_url="http://attacker.example:8000", spot_instance=False)
    await node.publish_refused(f"node.registered.{other}", msgspec.json.encode(hijack))
    for event_type in (*NODE_PUBLISHES, "node.kv_events"):
        await node.publish_refused(f"{event_type}.{other}")
    await node.publish_refused(f"node.command.{other}", b'{"command": "drain"}')
    await node.publish_refused(f"node.ack.{me}")  # acknowledge itself
    # Speak for the control plane: a key, a status, a tenant.
    key = ApiKeyCreated(key_id=uuid.uuid4(), tenant_id=tenant, environment_id=tenant,
                        key_hash="h" * 64, last_four="xxxx", name="forged",
                        role="admin")
    await node.publish_refused(f"apikey.created.{tenant}", msgspec.json.encode(key))
    for subject in (f"node.status_changed.{me}", f"node.launching.{me}",
                    f"tenant.created.{tenant}", "deployment.created.x", "dlq.x.y"):
        await node.publish_refused(subject)
    assert await messages(bus, USAGE.name) == 0
    assert await messages(bus, NODES.name) == 0
    assert await messages(bus, CONTROL.name) == 0
    # What it may say still goes through.
    ack = await node.nc.jetstream().publish(f"node.heartbeat.{me}", b"{}")
    assert ack.stream == "HEARTBEATS"


async def test_a_node_credential_hears_nothing_but_what_is_said_to_it(
        servers: Servers, intruder: Connect) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    node = await intruder(servers.node_creds(me))
    for subject in ("node.>", f"node.command.{other}", f"node.ack.{other}", "node.heartbeat.*",
                    "usage.>", "tenant.>", "apikey.>", ">", "_INBOX.>", "_INBOX.gateway.>",
                    "_INBOX.billing.>", f"_INBOX_NODE.{other}.>", "$JS.API.>", "dlq.>"):
        await node.subscribe_refused(subject)
    await node.nc.subscribe(f"node.command.{me}")  # its own
    await node.nc.flush()


async def test_a_node_credential_has_no_jetstream_api(servers: Servers, bus: Bus,
                                                       intruder: Connect) -> None:
    node = await intruder(servers.node_creds(uuid.uuid4()))
    await node.request_refused("$JS.API.INFO")
    await node.request_refused(f"$JS.API.STREAM.DELETE.{USAGE.name}")
    await node.request_refused(f"$JS.API.STREAM.PURGE.{NODES.name}")
    await node.request_refused(f"$JS.API.STREAM.INFO.{CONTROL.name}")
    await node.request_refused(f"$JS.API.CONSUMER.CREATE.{CONTROL.name}",
                               json.dumps({"stream_name": CONTROL.name,
                                           "config": {"ack_policy": "none"}}).encode())
    await node.request_refused(f"$JS.API.STREAM.MSG.GET.{CONTROL.name}",
                               b'{"seq": 1}')
    assert {s.config.name for s in await bus.js.streams_info()} >= {USAGE.name, NODES.name,
                                                                    CONTROL.name}


@pytest.mark.parametrize("role", [Role.MONITOR, Role.BILLING, Role.NOTIFIER, Role.ADMIN_API,
                                  Role.ORCHESTRATOR, Role.RELAY, Role.OBSERVER,
                                  Role.PROVISIONER])
async def test_only_a_gateway_credential_publishes_usage(servers: Servers, bus: Bus,
                                                         intruder: Connect, role: Role) -> None:
    tenant = uuid.uuid4()
    service = await intruder(servers.creds(role))
    await service.publish_refused(f"usage.recorded.{tenant}", forged_usage(tenant))
    assert await messages(bus, USAGE.name) == 0


@pytest.mark.parametrize("role", [Role.GATEWAY, Role.MONITOR, Role.BILLING, Role.NOTIFIER,
                                  Role.ADMIN_API, Role.ORCHESTRATOR, Role.OBSERVER])
async def test_a_service_credential_cannot_speak_for_the_control_plane_or_a_node(
        servers: Servers, bus: Bus, intruder: Connect, role: Role) -> None:
    service = await intruder(servers.creds(role))
    node = uuid.uuid4()
    for subject in (f"apikey.created.{node}", f"tenant.suspended.{node}",
                    f"node.status_changed.{node}", f"node.registered.{node}",
                    f"node.heartbeat.{node}"):
        await service.publish_refused(subject)
    for stream in (USAGE.name, NODES.name, CONTROL.name):
        await service.request_refused(f"$JS.API.STREAM.DELETE.{stream}")
        await service.request_refused(f"$JS.API.STREAM.PURGE.{stream}")
    assert await messages(bus, NODES.name) == 0 and await messages(bus, CONTROL.name) == 0


@pytest.mark.parametrize("role", [Role.GATEWAY, Role.OBSERVER, Role.MONITOR, Role.BILLING,
                                  Role.NOTIFIER])
async def test_a_credential_cannot_touch_another_services_consumer(
        servers: Servers, bus: Bus, intruder: Connect, role: Role) -> None:
    """A consumer made on a stream by name — durable, or ephemeral named like a durable —
    would rewrite that consumer (a filter matching nothing: the monitor hears no registration
    again). Readers replay mirrors instead, where no service keeps a consumer; each service
    reaches its own durable consumer only."""
    await bus.js.add_consumer(NODES.name, durable_name="monitor-nodes", ack_policy="explicit")
    await bus.js.add_consumer(USAGE.name, durable_name="billing-usage", ack_policy="explicit")
    service = await intruder(servers.creds(role))
    for stream, victim in ((NODES.name, "monitor-nodes"), (USAGE.name, "billing-usage"),
                           (CONTROL.name, "notifier-control")):
        if f"{role.value}-" in victim:
            continue  # its own
        rewrite = json.dumps({"stream_name": stream, "config": {
            "name": victim, "filter_subject": "node.ack.none", "max_deliver": 1,
            "ack_policy": "explicit"}}).encode()
        durable = json.dumps({"stream_name": stream, "config": {
            "durable_name": victim, "ack_policy": "none"}}).encode()
        await service.request_refused(f"$JS.API.CONSUMER.CREATE.{stream}", rewrite)
        await service.request_refused(f"$JS.API.CONSUMER.CREATE.{stream}.{victim}", rewrite)
        await service.request_refused(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{victim}",
                                      durable)
        await service.request_refused(f"$JS.API.CONSUMER.DELETE.{stream}.{victim}")
    for stream, durable_name in ((NODES.name, "monitor-nodes"), (USAGE.name, "billing-usage")):
        info = await bus.js.consumer_info(stream, durable_name)
        assert info.config.filter_subject is None and info.config.max_deliver in (None, -1)
        assert info.config.ack_policy == AckPolicy.EXPLICIT
    await service.subscribe_refused("_INBOX.monitor.>" if role is not Role.MONITOR
                                    else "_INBOX.billing.>")


async def test_readers_replay_the_mirrors(servers: Servers, bus: Bus) -> None:
    """What the gateway and operators read: the mirrors hold what their streams hold."""
    node = uuid.uuid4()
    await bus.publish(node_registered(node))
    observer = await Bus.connect(servers.nats_url, name="observer",
                                 creds=servers.creds(Role.OBSERVER))
    try:
        async def mirrored() -> bool:
            info = await observer.js.stream_info(NODES_VIEW.name)
            return bool(info.state.messages == 1)

        await eventually(mirrored, what="the registration in the mirror")
        got: list[str] = []

        async def keep(msg: Msg) -> None:
            got.append(msg.subject)

        sub = await observer.js.subscribe("node.>", stream=NODES_VIEW.name,
                                          ordered_consumer=True, cb=keep)
        await eventually(lambda: _true(got == [f"node.registered.{node}"]),
                         what="the registration replayed from the mirror")
        await sub.unsubscribe()
    finally:
        await observer.close()


async def test_strangers_and_forgers_cannot_connect(servers: Servers, nats_url: str) -> None:
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await nats.connect(nats_url, allow_reconnect=False, max_reconnect_attempts=0)
    # A credential from another authority (someone who made their own operator and account).
    elsewhere = Authority.create().user(Role.ADMIN)
    # A node credential that expired.
    issuer = servers.authority.node_issuer()
    expired = issuer.node_credentials(uuid.uuid4(), ttl_seconds=1, now=time.time() - 60)
    # A real node's JWT presented with another key's seed (the JWT alone proves nothing).
    real = issuer.node_credentials(uuid.uuid4(), ttl_seconds=60)
    stolen_jwt = (f"-----BEGIN NATS USER JWT-----\n{real.jwt}\n------END NATS USER JWT------\n"
                  f"-----BEGIN USER NKEY SEED-----\n{new_seed(KeyKind.USER)}\n"
                  f"------END USER NKEY SEED------\n")
    for creds in (elsewhere.text(), expired.text(), stolen_jwt):
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization|authentication"):
            await nats.connect(nats_url, user_credentials=nats.aio.client.RawCredentials(creds),
                               allow_reconnect=False, max_reconnect_attempts=0)


async def test_a_tls_url_answered_in_plain_text_gets_no_signature(servers: Servers) -> None:
    """Someone in the middle of a node's tls:// connection answers as a NATS server without
    TLS and hands the node a nonce to sign: with it, it could connect as the node. The node's
    client refuses to sign over plain text, and keeps trying."""
    heard: list[bytes] = []
    attempts = 0

    async def pretend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        info = {"server_id": "MITM", "version": "2.10.0", "proto": 1, "headers": True,
                "max_payload": 1048576, "nonce": "sign-me-please", "tls_required": False}
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        await writer.drain()
        try:
            while line := await reader.readline():
                heard.append(line)
        finally:
            writer.close()

    server = await asyncio.start_server(pretend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connecting = asyncio.create_task(Bus.connect(
        f"tls://127.0.0.1:{port}", name="agent", creds=servers.node_creds(uuid.uuid4())))
    try:
        await eventually(lambda: _true(attempts >= 3), timeout=30,
                         what="the client trying again")
        assert not connecting.done()
        assert not any(b'"sig"' in line or b"sign-me-please" in line for line in heard), heard
    finally:
        # nats-py's connect loop can swallow a cancellation: stop_task asks again.
        await stop_task(connecting, grace=0.5)
        server.close()
        await server.wait_closed()


async def _true(value: bool) -> bool:
    return value
