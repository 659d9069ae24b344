"""Spend budgets in the Redis limiter (issue 21, work in progress): nano-dollars reserved at
admission in the same script as the rate limits, settled to the real cost, exact however
many requests race, per period the gateway names, and refused without Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.gateway.ratelimit import (
    BudgetCap,
    Decision,
    Layer,
    LimitSubject,
    RedisRateLimiter,
    connect_redis,
)
from services.gateway.ratelimit.limits import Check, Reservation
from services.gateway.ratelimit.planning import plan
from services.infra.pipelined_redis import PipelinedRedis
from tests.helpers import eventually
from tests.integration.test_ratelimit_redis import NONE, only

KEY = LimitSubject(key_id="k1", environment_id="e1", tenant_id="t1")
SIBLING = LimitSubject(key_id="k2", environment_id="e1", tenant_id="t1")


def period_end(hours: float = 1.0) -> int:
    return int((time.time() + hours * 3600) * 1000)


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url, timeout=5)
    yield client
    await client.aclose()


RECORDED: dict[str, int] = {}
"""Billing's records, as far as these tests go: nano-dollars spent per budget key (the
gateway's real reader, of usage_records, is tested through the gateway)."""


async def recorded(subject: LimitSubject, checks: Sequence[Check]) -> list[int]:
    return [RECORDED.get(c.key, 0) for c in checks]


@pytest.fixture
def limiter(r: aioredis.Redis) -> RedisRateLimiter:
    RECORDED.clear()
    return RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, budget_spent=recorded)


def held(reservation: Reservation | None) -> Reservation:
    assert reservation is not None
    return reservation


async def spent(r: aioredis.Redis, key: str) -> int:
    return int(await r.hget(key, "n") or 0)


async def test_a_budget_admits_what_fits_and_names_itself_when_full(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    end = period_end()
    limits = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, end),))
    for _ in range(3):
        assert (await limiter.acquire(KEY, limits, 10, 300)).allowed
    refused = await limiter.acquire(KEY, limits, 10, 300)
    assert not refused.allowed and refused.status == 429
    assert refused.layer is Layer.KEY_BUDGET
    assert refused.headers["x-ratelimit-scope"] == "key_budget"
    assert 3500 < refused.retry_after <= 3600  # until the period ends
    assert await spent(r, "budget:key:k1:{t1}") == 900
    assert int(await r.hget("budget:key:k1:{t1}", "w") or 0) == end


async def test_settling_charges_the_real_cost_and_gives_the_rest_back(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    limits = only(key_tokens_per_day=10**9,
                  budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, period_end()),
                           BudgetCap(Layer.TENANT_BUDGET, 5000, period_end(24))))
    first = held((await limiter.acquire(KEY, limits, 50, 600)).reservation)
    assert await spent(r, "budget:key:k1:{t1}") == 600 == await spent(r, "budget:tenant:t1:{t1}")
    assert not (await limiter.acquire(KEY, limits, 50, 600)).allowed
    await limiter.settle(first, 20, 150)
    assert await spent(r, "budget:key:k1:{t1}") == 150 == await spent(r, "budget:tenant:t1:{t1}")
    assert int(await r.hget("tokens:key:k1:day:{t1}", "n") or 0) == 20  # tokens apart from money
    await limiter.settle(first, 20, 999)  # settled once: nothing more
    assert await spent(r, "budget:key:k1:{t1}") == 150
    assert (await limiter.acquire(KEY, limits, 50, 600)).allowed


async def test_racing_requests_never_overshoot_a_shared_budget(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    """Sixty requests at once under a tenant budget of ten of them, from two keys."""
    limits = only(budgets=(BudgetCap(Layer.TENANT_BUDGET, 10 * 77, period_end()),))
    decisions = await asyncio.gather(*(
        limiter.acquire(KEY if i % 2 else SIBLING, limits, 1, 77) for i in range(60)))
    assert sum(d.allowed for d in decisions) == 10
    assert {d.layer for d in decisions if not d.allowed} == {Layer.TENANT_BUDGET}
    assert await spent(r, "budget:tenant:t1:{t1}") == 770


async def test_the_last_requests_of_a_period_run_with_what_is_left(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    """A request whose worst case (800) does not fit is granted what is left of the tightest
    budget, if that pays for the least it can run with (100); racing requests share what is
    left without passing it, and below the least the budget refuses."""
    limits = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, period_end()),
                           BudgetCap(Layer.TENANT_BUDGET, 1_500, period_end(24))))
    first = held((await limiter.acquire(KEY, limits, 1, 800, 100)).reservation)
    assert first.money == 800
    racing = await asyncio.gather(*(limiter.acquire(KEY, limits, 1, 800, 100)
                                     for _ in range(5)))
    granted = [d.reservation.money for d in racing if d.reservation is not None]
    assert granted == [200]  # all that was left at the key, to one of them
    assert {d.layer for d in racing if not d.allowed} == {Layer.KEY_BUDGET}
    assert await spent(r, "budget:key:k1:{t1}") == 1000
    await limiter.settle(first, 1, 300)  # 500 back at the key; the tenant has 1500 - 500
    sibling = held((await limiter.acquire(SIBLING, limits, 1, 800, 100)).reservation)
    assert sibling.money == 800  # its own key is empty; the tenant had 1000 left
    tail = held((await limiter.acquire(KEY, limits, 1, 800, 100)).reservation)
    assert tail.money == 200  # the tenant's 200 left binds now, not the key's 500
    assert await spent(r, "budget:tenant:t1:{t1}") == 1_500
    refused = await limiter.acquire(KEY, limits, 1, 800, 100)
    assert not refused.allowed and refused.layer is Layer.TENANT_BUDGET


async def test_a_new_period_starts_from_nothing_and_old_settles_stay_out_of_it(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    old = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 100, period_end(0.5)),))
    reservation = held((await limiter.acquire(KEY, old, 1, 100)).reservation)
    assert not (await limiter.acquire(KEY, old, 1, 1)).allowed
    new = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 100, period_end(1.5)),))
    assert (await limiter.acquire(KEY, new, 1, 40)).allowed
    await limiter.settle(reservation, 1, 0)  # the old period's refund: not the new one's
    assert await spent(r, "budget:key:k1:{t1}") == 40


async def test_batched_settles_charge_money_and_tokens_apart(
        r: aioredis.Redis, redis_url: str) -> None:
    pipelined = PipelinedRedis(redis_url, timeout=5)
    limiter = RedisRateLimiter(pipelined, registry=CollectorRegistry(), timeout=5,
                               budget_spent=recorded)
    await limiter.load_scripts()
    limits = only(key_tokens_per_day=10**9,
                  budgets=(BudgetCap(Layer.ENVIRONMENT_BUDGET, 10**6, period_end()),))
    mine = [held((await limiter.acquire(KEY, limits, 100, 1000)).reservation)
            for _ in range(3)]
    for reservation, cost in zip(mine, (10, 500, 1000), strict=True):
        limiter.settle_nowait(reservation, 7, cost)

    async def released() -> bool:
        return await r.zcard("ratelimit:key:k1:concurrency:{t1}") == 0

    await eventually(released, what="the leases released")
    assert await spent(r, "budget:env:e1:{t1}") == 1510
    assert int(await r.hget("tokens:key:k1:day:{t1}", "n") or 0) == 21
    await pipelined.aclose()


async def test_without_redis_a_budgeted_request_is_refused_whatever_the_policy() -> None:
    dead = connect_redis("redis://127.0.0.1:1", timeout=0.2)
    for policy in ("local", "allow"):
        limiter = RedisRateLimiter(dead, policy=policy, registry=CollectorRegistry(),
                                   timeout=0.2, cooldown=0)
        budgeted = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 10**9, period_end()),))
        refused = await limiter.acquire(KEY, budgeted, 1, 1)
        assert not refused.allowed and refused.status == 503, policy
        assert (await limiter.acquire(KEY, NONE, 1)).allowed, policy  # the others: as before
    await dead.aclose()


async def test_a_budget_starts_from_what_billing_recorded_and_again_after_redis_lost_it(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    limits = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, period_end()),))
    RECORDED["budget:key:k1:{t1}"] = 700  # spent earlier this period
    assert (await limiter.acquire(KEY, limits, 1, 300)).allowed
    assert not (await limiter.acquire(KEY, limits, 1, 1)).allowed
    assert await spent(r, "budget:key:k1:{t1}") == 1000
    await r.flushdb()  # Redis lost everything; billing recorded 900 by now
    RECORDED["budget:key:k1:{t1}"] = 900
    assert not (await limiter.acquire(KEY, limits, 1, 101)).allowed
    assert (await limiter.acquire(KEY, limits, 1, 100)).allowed
    assert await spent(r, "budget:key:k1:{t1}") == 1000


async def test_reconciling_raises_a_counter_to_billing_and_never_lowers_it(
        limiter: RedisRateLimiter, r: aioredis.Redis) -> None:
    end = period_end()
    limits = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, end),))
    held((await limiter.acquire(KEY, limits, 1, 400)).reservation)  # in flight
    [check] = [c for c in plan(KEY, limits, 1, 400) if c.layer is Layer.KEY_BUDGET]
    assert await limiter.reconcile([check], [100]) == [0]  # billing is behind: kept
    assert await spent(r, "budget:key:k1:{t1}") == 400
    assert await limiter.reconcile([check], [650]) == [250]  # drift: raised
    assert await spent(r, "budget:key:k1:{t1}") == 650
    # A counter of another period (or none) is left for its next request to seed.
    stale = dataclasses.replace(check, window_ms=end + 3_600_000)
    assert await limiter.reconcile([stale], [900]) == [0]
    assert await spent(r, "budget:key:k1:{t1}") == 650
    assert limiter.metrics.budget_drift.labels("reconcile")._value.get() == 250


async def test_without_billing_records_a_budgeted_request_waits(r: aioredis.Redis) -> None:
    async def unreachable(subject: LimitSubject, checks: Sequence[Check]) -> list[int]:
        raise OSError("no database")

    limiter = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5,
                               budget_spent=unreachable)
    limits = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, period_end()),))
    refused = await limiter.acquire(KEY, limits, 1, 1)
    assert not refused.allowed and refused.status == 503


async def test_a_reservation_whose_gateway_died_is_given_back_when_its_lease_expires(
        r: aioredis.Redis) -> None:
    """A gateway that dies mid-request never settles: its lease expires, and the next
    request of the key gives the money back before it is judged. A lease still held keeps
    its money; a settle that comes after the lease expired changes nothing."""
    RECORDED.clear()
    # The doomed gateway's leases last half a second; the live one's, long enough for a
    # busy machine.
    doomed = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, lease_ttl=0.5,
                              budget_spent=recorded)
    live = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, lease_ttl=60,
                            budget_spent=recorded)
    limits = only(budgets=(BudgetCap(Layer.KEY_BUDGET, 1000, period_end()),))
    dead = held((await doomed.acquire(KEY, limits, 1, 800, 100)).reservation)
    alive = held((await live.acquire(KEY, limits, 1, 800, 100)).reservation)
    assert (dead.money, alive.money) == (800, 200)
    assert "|800|budget:key:k1:{t1}@" in dead.lease_id  # what the lease holds, for whoever finds it
    async def admitted() -> Decision | None:
        decision = await live.acquire(KEY, limits, 1, 800, 100)
        return decision if decision.allowed else None

    granted = await eventually(admitted, timeout=30, what="the dead request's money given back")
    assert held(granted.reservation).money == 800  # 1000 - 200 (alive) held, not - 1000
    assert await spent(r, "budget:key:k1:{t1}") == 1000
    await doomed.settle(dead, 1, 500)  # too late: its money is back already
    assert await spent(r, "budget:key:k1:{t1}") == 1000
    await live.settle(alive, 1, 150)
    assert await spent(r, "budget:key:k1:{t1}") == 950


async def test_the_reconciler_gives_back_what_an_idle_keys_dead_requests_hold(
        r: aioredis.Redis) -> None:
    """A key that sends no more requests cannot give back its own dead reservations, which
    may hold its tenant's budget against every other key: the reconciler's sweep does."""
    from typing import Any, cast

    from services.gateway.budget_reconciler import BudgetReconciler

    limiter = RedisRateLimiter(r, registry=CollectorRegistry(), timeout=5, lease_ttl=0.3,
                               budget_spent=recorded)
    RECORDED.clear()
    limits = only(budgets=(BudgetCap(Layer.TENANT_BUDGET, 1000, period_end()),))
    dead = held((await limiter.acquire(KEY, limits, 1, 900)).reservation)
    reconciler = BudgetReconciler(cast(Any, None), r, limiter, interval=60)

    async def swept() -> int:
        return await reconciler.sweep_once()

    back = await eventually(swept, timeout=30, what="the dead reservation swept")
    assert back == 900 and await spent(r, "budget:tenant:t1:{t1}") == 0
    assert limiter.metrics.budget_refunds._value.get() == 900
    assert (await limiter.acquire(SIBLING, limits, 1, 900)).allowed
    await limiter.settle(dead, 1, 10)
    assert await spent(r, "budget:tenant:t1:{t1}") == 900
