"""The agent's background tasks are supervised: a failure is logged and the task restarted."""

from __future__ import annotations

import random

from structlog.testing import capture_logs

from agent.node_agent import supervise
from services.infra.aio import within
from services.infra.backoff import Backoff


async def test_a_failing_task_is_logged_and_restarted_until_it_returns() -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")

    fast = Backoff(initial=0.01, maximum=0.02, rng=random.Random(0))
    with capture_logs() as logs:
        await within(supervise("flaky", flaky, backoff=fast), 5)
    assert runs == [0, 1, 2]
    failures = [e for e in logs if e["event"] == "background task failed; restarting it"]
    assert [e["task"] for e in failures] == ["flaky", "flaky"]
    assert all(e["log_level"] == "error" and e.get("exc_info") for e in failures)


async def test_a_task_that_returns_is_not_restarted() -> None:
    runs: list[int] = []

    async def once() -> None:
        runs.append(1)

    await within(supervise("once", once), 5)
    assert runs == [1]
