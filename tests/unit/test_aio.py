"""services.infra.aio: waits that never swallow a cancellation, and stopping a task for sure."""

from __future__ import annotations

import asyncio

import pytest

from services.infra.aio import stop_task, wait_event, within


async def _cancel_as_it_wakes(steps: int) -> bool:
    """A loop woken by an event, cancelled `steps` turns of the loop after a wake-up: the
    moment Python 3.11's wait_for swallows the cancellation. True when the loop ended."""
    wake = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait_event(wake, 10)
            wake.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    wake.set()
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return bool(done) and task.cancelled()


@pytest.mark.parametrize("steps", range(6))
async def test_a_cancellation_as_the_event_is_set_is_never_swallowed(steps: int) -> None:
    assert await _cancel_as_it_wakes(steps)


async def test_wait_event_says_whether_it_was_set() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5)
    assert await wait_event(event, 0)  # already set: no wait at all


async def test_within_returns_or_times_out() -> None:
    assert await within(asyncio.sleep(0, "x"), 1) == "x"
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(5), 0.01)


async def test_stop_task_cancels_again_a_task_that_ignored_the_first() -> None:
    ignored = 0

    async def stubborn() -> None:
        nonlocal ignored
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if ignored == 0:
                    ignored += 1  # what a swallowed cancellation looks like
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await within(stop_task(task, grace=0.05), 5)
    assert task.cancelled() and ignored == 1


async def test_a_cancelled_caller_still_waits_for_the_task_to_end() -> None:
    ended = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.05)  # cleaning up
            ended.set()

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task))
    await asyncio.sleep(0.01)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert ended.is_set() and task.done()


async def test_nested_stops_escalate_even_while_the_outer_one_keeps_cancelling() -> None:
    """A leader's work stopping its own worker, stopped in turn by the service: the worker
    swallows its first cancellation (as aiohttp's timeout or 3.11's wait_for can). The inner
    stop must still cancel it again, although the outer stop interrupts it every `grace`."""
    swallowed = 0

    async def worker() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    continue
                raise

    async def lead() -> None:
        inner = asyncio.create_task(worker())
        try:
            await asyncio.sleep(10)
        finally:
            await stop_task(inner, grace=0.1)

    outer = asyncio.create_task(lead())
    await asyncio.sleep(0.01)
    await within(stop_task(outer, grace=0.1), 5)
    assert outer.cancelled() and swallowed == 1
