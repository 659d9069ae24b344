"""A node whose credential is revoked is cut off within seconds: the orchestrator's keeper (what
its leader runs every tick) revokes the credentials of nodes that ended, NATS closes their
connections and refuses them back, the agent leaves, and the refusal shows in a metric."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import RawCredentials
from prometheus_client import CollectorRegistry

from agent.node_agent import EXIT_REFUSED, NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.events import NodeLaunching
from schemas.ids import uuid7
from services.domain.fleet import Fleet
from services.domain.node_states import Signal
from services.infra.eventlog import EventLog
from services.infra.natsauth.authority import NodeIssuer
from services.infra.natsauth.revocations import AccountResolver, revocations_of
from services.infra.settings import Secret
from services.orchestrator.credentials import CredentialKeeper, node_credentials
from tests.conftest import Servers
from tests.helpers import eventually, served_account
from tests.integration.test_monitor_basics import serve

CUT_OFF_WITHIN = 5.0
"""Seconds from the keeper's push to the node's connection closed (it takes milliseconds
on a quiet machine; the margin is for a busy one)."""


async def launch(pool: asyncpg.Pool, issuer: NodeIssuer) -> tuple[Any, str]:
    """A node as the orchestrator launches it: its credential minted, its key in the log."""
    node_id = uuid7()
    now = datetime.now(UTC)
    creds, expires = node_credentials(issuer, node_id, 3600, now)
    await Fleet(EventLog(pool), actor="orchestrator").launching(NodeLaunching(
        node_id=node_id, deployment_id=None, cluster_name=f"c-{node_id.hex[:8]}",
        model_name="m", provider="local", region="local", gpu_type="none", spot=False,
        deadline=now + timedelta(minutes=15), credential_key=creds.public_key,
        credential_expires_at=expires))
    return node_id, creds.text()


async def connected(keeper: CredentialKeeper) -> CredentialKeeper:
    """The keeper connects in the background (the leader's loop never waits for NATS): wait
    for it here, so that the next sync talks to the servers."""
    keeper.start()
    await eventually(lambda: _true(keeper.connected), what="the keeper connected to NATS")
    return keeper


def refused(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("nats_connections_refused_total", {"reason": reason})
    return value or 0.0


async def test_a_revoked_node_is_cut_off_within_seconds_and_its_agent_leaves(
        servers: Servers, pool: asyncpg.Pool, nats_url: str) -> None:
    issuer = NodeIssuer.from_json(servers.node_issuer())
    registry = CollectorRegistry()
    keeper = CredentialKeeper(issuer, nats_url, pool, registry=registry)
    doomed, doomed_creds = await launch(pool, issuer)
    spared, spared_creds = await launch(pool, issuer)
    sim_url, sim = await serve(create_app(SimulatorConfig(model="m")))
    agent = NodeAgent(AgentSettings(
        nats_url=Secret(nats_url), nats_creds=Secret(doomed_creds), node_id=doomed,
        model_name="m", vllm_url=sim_url, heartbeat_interval=0.2, registration_timeout=0.5,
        sigterm_drain_timeout=1.0, drain_grace=0.1, log_json=False))
    running = asyncio.create_task(agent.run())
    bystander = await nats.connect(nats_url, user_credentials=RawCredentials(spared_creds),
                                   max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        await eventually(lambda: _true(agent.bus is not None and agent.bus.connected),
                         what="the doomed node connected")
        await connected(keeper)
        assert not await keeper.sync()  # nothing has ended: nothing to push

        await Fleet(EventLog(pool), actor="orchestrator").signal(doomed, Signal.CLOUD_LOST,
                                                                 reason="red team")
        began = time.monotonic()
        assert await keeper.sync()
        assert agent.bus is not None
        await asyncio.wait_for(agent.bus.closed.wait(), CUT_OFF_WITHIN)
        cut_off = time.monotonic() - began
        assert await asyncio.wait_for(running, 30) == EXIT_REFUSED

        # It cannot come back with the same credential, and the servers' refusal is counted.
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nats.connect(nats_url, user_credentials=RawCredentials(doomed_creds),
                               allow_reconnect=False, max_reconnect_attempts=0)
        await eventually(lambda: _true(refused(registry, "credentials_revoked") >= 1),
                         what="the revocation counted")
        await eventually(lambda: _true(refused(registry, "authentication_failure") >= 1),
                         what="the refused reconnection counted")
        # Another node's credential is untouched.
        assert bystander.is_connected
        await bystander.publish(f"node.heartbeat.{spared}", b"{}")
        await bystander.flush()
        print(f"cut off {cut_off * 1000:.0f} ms after the push")
    finally:
        if not running.done():
            running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await bystander.close()
        await keeper.close()
        await sim.cleanup()


async def test_revocations_outlive_a_new_leader_and_end_with_the_credential(
        servers: Servers, pool: asyncpg.Pool, nats_url: str) -> None:
    """A new leader finds the servers' revocations and adds to them; a revocation is forgotten
    once the credential it stops has expired (the account JWT does not grow for ever)."""
    issuer = NodeIssuer.from_json(servers.node_issuer())
    first, _ = await launch(pool, issuer)
    second, _ = await launch(pool, issuer)
    fleet = Fleet(EventLog(pool), actor="orchestrator")
    keys = {r["id"]: r["credential_key"] for r in await pool.fetch(
        "SELECT id, credential_key FROM nodes WHERE id = ANY($1)", [first, second])}
    await fleet.signal(first, Signal.GONE, reason="scaled down")
    leader = await connected(CredentialKeeper(issuer, nats_url, pool,
                                              registry=CollectorRegistry()))
    assert await leader.sync()
    await leader.close()

    await fleet.signal(second, Signal.GONE, reason="scaled down")
    successor = await connected(CredentialKeeper(issuer, nats_url, pool,
                                                 registry=CollectorRegistry()))
    try:
        assert await successor.sync()
        nc = await nats.connect(nats_url, user_credentials=RawCredentials(
            issuer.system_creds.text()))
        try:
            resolver = AccountResolver(nc, issuer.account)
            assert set(revocations_of(await resolver.lookup())) >= {keys[first], keys[second]}
            # The first credential expires: its revocation is kept for a margin (the
            # servers' clock may be behind ours), then goes.
            successor.verify_every = 0  # look again now rather than in a minute
            await pool.execute("UPDATE nodes SET credential_expires_at = now() - interval '1s' "
                               "WHERE id = $1", first)
            assert not await successor.sync()
            assert keys[first] in revocations_of(await resolver.lookup())
            await pool.execute("UPDATE nodes SET credential_expires_at = now() - interval "
                               "'11 minutes' WHERE id = $1", first)
            assert await successor.sync()
            left = revocations_of(await resolver.lookup())
            assert keys[first] not in left and keys[second] in left
        finally:
            await nc.close()
    finally:
        await successor.close()


async def test_a_revocation_is_made_at_the_credentials_expiry_and_never_pushed_again(
        servers: Servers, pool: asyncpg.Pool, nats_url: str) -> None:
    """Revoking "at now" moved every revocation forward at every verification, and each push
    makes the servers re-check every connection of the account. At the credential's own
    expiry the revocation is the same whenever, and by whichever leader, it is made."""
    issuer = NodeIssuer.from_json(servers.node_issuer())
    registry = CollectorRegistry()
    keeper = await connected(CredentialKeeper(issuer, nats_url, pool, registry=registry,
                                              verify_every=0))
    node, _ = await launch(pool, issuer)
    key, expires = (await pool.fetchrow(
        "SELECT credential_key, credential_expires_at FROM nodes WHERE id = $1", node)).values()
    await Fleet(EventLog(pool), actor="orchestrator").signal(node, Signal.GONE, reason="done")
    try:
        assert await keeper.sync()
        pushes = registry.get_sample_value("orchestrator_account_pushes_total",
                                           {"outcome": "ok"})
        account = await served_account(nats_url, issuer)
        assert revocations_of(account)[key] == int(expires.timestamp())
        assert registry.get_sample_value("orchestrator_account_jwt_bytes") == len(account)
        # Verifications later (a minute, an hour: any `now`), by this leader or the next:
        # nothing to push.
        for later in (timedelta(minutes=1), timedelta(hours=1)):
            assert not await keeper.sync(datetime.now(UTC) + later)
        keeper.forget_state()
        assert not await keeper.sync(datetime.now(UTC) + timedelta(minutes=2))
        assert registry.get_sample_value("orchestrator_account_pushes_total",
                                         {"outcome": "ok"}) == pushes
    finally:
        await keeper.close()


async def _true(value: bool) -> bool:
    return value
