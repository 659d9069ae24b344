"""The orchestrator's credential keeper never holds up the leader: NATS unreachable, or the
system account's credential refused, and the leader still ticks and launches; revocations go
out once NATS answers. And the account JWT's size is watched."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from services.infra.aio import stop_task
from services.infra.devstack import free_port
from services.infra.natsauth.authority import Authority, NodeIssuer
from services.infra.natsauth.revocations import revocations_of
from services.orchestrator.credentials import CredentialKeeper
from tests.conftest import Servers
from tests.helpers import ended_node, eventually, served_account
from tests.integration.fleet_fixtures import Rig, rig  # noqa: F401  (fixture)

PROMPTLY = 2.0
"""A sync that does not talk to NATS takes a few database queries."""


def unreachable(servers: Servers) -> tuple[NodeIssuer, str]:
    return NodeIssuer.from_json(servers.node_issuer()), f"nats://127.0.0.1:{free_port()}"


def refused(servers: Servers) -> tuple[NodeIssuer, str]:
    """The right servers, but a system user another authority signed: NATS refuses it."""
    mine = NodeIssuer.from_json(servers.node_issuer())
    stranger = Authority.create().node_issuer().system_creds
    return NodeIssuer(account=mine.account, node_signing_seed=mine.node_signing_seed,
                      operator_signing_seed=mine.operator_signing_seed,
                      system_creds=stranger), servers.nats_url


@pytest.mark.parametrize("nats_trouble", [unreachable, refused])
async def test_a_keeper_that_cannot_talk_to_nats_returns_at_once(
        servers: Servers, pool: asyncpg.Pool, nats_url: str, nats_trouble: Any) -> None:
    issuer, url = nats_trouble(servers)
    keeper = CredentialKeeper(issuer, url, pool, registry=CollectorRegistry(),
                              reconnect_after=0.2)
    await ended_node(pool, issuer)
    try:
        with capture_logs() as logs:
            for _ in range(5):
                async with asyncio.timeout(PROMPTLY):
                    assert not await keeper.sync()
            if nats_trouble is refused:
                async def said_so() -> bool:
                    return any("system account's credential" in e["event"] for e in logs)

                await eventually(said_so, what="the refused system user reported")
        assert not keeper.connected
    finally:
        await keeper.close()


@pytest.mark.parametrize("nats_trouble", [unreachable, refused])
async def test_the_leader_goes_on_launching_while_revocations_cannot_reach_nats(
        rig: Rig, nats_trouble: Any) -> None:  # noqa: F811
    issuer, url = nats_trouble(rig.servers)
    await ended_node(rig.pool, issuer)
    keeper = CredentialKeeper(issuer, url, rig.pool, registry=CollectorRegistry())
    o = rig.orchestrator(reconcile_every_seconds=0.05)
    o.credentials = keeper
    await rig.deploy(min_nodes=1, max_nodes=1)
    lead = asyncio.create_task(o.lead())
    try:
        async def launched() -> bool:
            return bool(rig.cloud.launches)

        await eventually(launched, what="the leader launching")

        async def ticking() -> bool:
            return o.ticks >= 10

        await eventually(ticking, what="the leader ticking on")
        assert not lead.done()
    finally:
        await stop_task(lead)
        await keeper.close()


async def test_revocations_go_out_once_nats_answers_and_a_large_account_is_reported(
        servers: Servers, pool: asyncpg.Pool, nats_url: str) -> None:
    issuer = NodeIssuer.from_json(servers.node_issuer())
    registry = CollectorRegistry()
    keeper = CredentialKeeper(issuer, nats_url, pool, registry=registry, jwt_warn_bytes=1000)
    key = await ended_node(pool, issuer)
    try:
        with capture_logs() as logs:
            async def pushed() -> bool:
                return await keeper.sync()

            # The first syncs only start the connection; one after it is up pushes.
            await eventually(pushed, what="the revocation pushed")
        size = registry.get_sample_value("orchestrator_account_jwt_bytes")
        assert size is not None and size > 1000
        warned = [e for e in logs if e["event"].startswith("the account JWT is large")]
        assert warned and warned[0]["bytes"] == size and warned[0]["max_payload"] == 1024 * 1024
        assert key in revocations_of(await served_account(nats_url, issuer))
    finally:
        await keeper.close()
