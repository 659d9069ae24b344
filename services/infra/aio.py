"""Waiting and stopping that never lose a cancellation.

On Python 3.11, ``asyncio.wait_for(x, t)`` returns x's result when a cancellation arrives just
as x finishes: the cancellation is swallowed (CPython gh-86296, fixed in 3.12). A loop that
waits on a wake-up event that way, and is woken often, can then ignore its shutdown and run
on. ``asyncio.timeout`` tells its own cancellation from the caller's, so these helpers use it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("aio")

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` passes; True when it is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`aw`'s result, or TimeoutError after `timeout`: asyncio.wait_for without the swallow."""
    async with asyncio.timeout(timeout):
        return await aw


async def stop_task(task: asyncio.Task[object], *, grace: float = 5.0) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again every `grace` seconds if
    it has not (its own waits may have swallowed the first). If the caller is cancelled
    meanwhile, it still waits for the task to end, then raises CancelledError."""
    caller_cancelled = False
    loop = asyncio.get_running_loop()
    task.cancel()
    again_at = loop.time() + grace
    while not task.done():
        try:
            await asyncio.wait({task}, timeout=max(0.0, again_at - loop.time()))
        except asyncio.CancelledError:
            # The task may be cleaning up: let it finish. The schedule of cancelling it again
            # is kept, not restarted: a caller cancelled every `grace` seconds (a stop_task
            # above this one) would otherwise keep this one from ever cancelling again.
            caller_cancelled = True
            continue
        if not task.done():
            log.warning("task still running after cancel; cancelling again",
                        task=task.get_name())
            task.cancel()
            again_at = loop.time() + grace
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()  # retrieved, so asyncio does not warn; the owner logged it
    if caller_cancelled:
        raise asyncio.CancelledError


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, grace: float = 5.0) -> None:
    """`stop_task` for each, all at once. Not `cancel()` then `gather()`: a task whose wait
    swallowed that one cancellation (nats-py's fetch waits with wait_for) would hold the
    gather, and the shutdown with it, for ever."""
    await asyncio.gather(*(stop_task(t, grace=grace) for t in tasks))
