"""Watching the cloud's metadata service for a spot/preemption notice (agent/spot.py holds
the per-cloud detectors): poll until a notice comes, through any outage of the service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import structlog

from agent.settings import AgentSettings
from agent.spot import SpotNotice, detector_for
from services.infra.backoff import Backoff

log = structlog.get_logger("agent")


async def watch_spot(settings: AgentSettings, session: aiohttp.ClientSession,
                     on_notice: Callable[[SpotNotice], Awaitable[None]]) -> None:
    """Poll the metadata service until a notice comes, hand it to `on_notice` and return.
    Returns at once for a node that is not a spot instance."""
    s = settings
    detector = detector_for(s.provider, s.metadata_base) if s.spot_instance else None
    if detector is None:
        if s.spot_instance:  # settings refuse this; say so if it ever gets through
            log.error("spot instance without spot detection", provider=s.provider)
        return
    interval = max(0.01, s.spot_poll_interval)
    backoff = Backoff(initial=interval, maximum=max(interval, 10.0))
    failing = False
    while True:
        try:
            notice = await detector.poll(session)
        except Exception as exc:  # one failed look; the next poll may well succeed
            if not failing:  # say it once per outage, not every poll
                expected = isinstance(exc, aiohttp.ClientError | TimeoutError | ValueError)
                log.warning("metadata service unreachable or answering nonsense",
                            provider=s.provider, error=str(exc) or type(exc).__name__,
                            exc_info=not expected)
            failing = True
            await asyncio.sleep(backoff.next())
            continue
        if failing:
            log.info("metadata service answering again", provider=s.provider)
            failing = False
            backoff.reset()
        if notice is not None:
            await on_notice(notice)
            return
        if detector.pause_before_next:
            await asyncio.sleep(interval)
