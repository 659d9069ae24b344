"""Spot detectors against the local metadata service over real HTTP: GCP's long poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from agent.local_cloud.metadata import STATE, MetadataState, create_metadata_app
from agent.spot import GcpSpot
from services.infra.aio import within
from services.infra.devstack import free_port
from tests.helpers import eventually

GOOGLE = {"Metadata-Flavor": "Google"}


@pytest.fixture
async def metadata() -> AsyncIterator[tuple[str, MetadataState]]:
    app = create_metadata_app()
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", app[STATE]
    await runner.cleanup()


async def get_preempted(session: aiohttp.ClientSession, base: str,
                        **params: str) -> tuple[str, str, float]:
    started = time.monotonic()
    async with session.get(f"{base}/computeMetadata/v1/instance/preempted", params=params,
                           headers=GOOGLE) as resp:
        assert resp.status == 200
        return await resp.text(), resp.headers["ETag"], time.monotonic() - started


async def test_local_gcp_server_follows_last_etag(
        metadata: tuple[str, MetadataState]) -> None:
    base, state = metadata
    async with aiohttp.ClientSession() as s:
        body, etag, _ = await get_preempted(s, base)
        assert body == "FALSE"
        # Another ETag than the value's: answered at once.
        body, same, took = await get_preempted(s, base, wait_for_change="true",
                                               last_etag="NONE", timeout_sec="30")
        assert (body, same) == ("FALSE", etag) and took < 5
        # The value's own ETag: held until the timeout, then the value unchanged.
        body, same, took = await get_preempted(s, base, wait_for_change="true",
                                               last_etag=etag, timeout_sec="1")
        assert (body, same) == ("FALSE", etag) and took >= 0.9

        state.gcp_preempt()
        body, preempted_etag, took = await get_preempted(
            s, base, wait_for_change="true", last_etag=etag, timeout_sec="30")
        assert body == "TRUE" and preempted_etag != etag and took < 5
        # Already preempted, and the caller has seen it: it waits like any unchanged value.
        body, _, took = await get_preempted(s, base, wait_for_change="true",
                                            last_etag=preempted_etag, timeout_sec="1")
        assert body == "TRUE" and took >= 0.9


async def test_gcp_preemption_between_two_polls_is_seen_at_once(
        metadata: tuple[str, MetadataState]) -> None:
    """The notice gives 30 s: a poll that only waits for the *next* change would miss one that
    came while no poll was open, and notice it a whole long poll late."""
    base, state = metadata
    detector = GcpSpot(base, wait_seconds=30)
    async with aiohttp.ClientSession() as s:
        assert await within(detector.poll(s), 5) is None
        assert detector.etag is not None and not detector.pause_before_next
        state.gcp_preempt()  # no poll is open now
        notice = await within(detector.poll(s), 5)
    assert notice is not None and notice.provider == "gcp"


async def test_gcp_long_poll_wakes_on_preemption(
        metadata: tuple[str, MetadataState]) -> None:
    base, state = metadata
    detector = GcpSpot(base, wait_seconds=30)
    async with aiohttp.ClientSession() as s:
        assert await within(detector.poll(s), 5) is None
        polling = asyncio.create_task(detector.poll(s))

        async def second_poll_open() -> bool:
            return state.requests.count("gcp") == 2

        await eventually(second_poll_open, what="the long poll reaches the server")
        assert not polling.done()
        state.gcp_preempt()
        notice = await within(polling, 5)
    assert notice is not None


async def test_gcp_detector_without_a_server_raises(
        metadata: tuple[str, MetadataState]) -> None:
    detector = GcpSpot(f"http://127.0.0.1:{free_port()}", wait_seconds=1)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await detector.poll(s)
    assert detector.pause_before_next  # no ETag yet: the caller must pause
