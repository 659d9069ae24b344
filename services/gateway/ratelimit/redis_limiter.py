"""The Redis limiter: every check of a request in one EVALSHA, exact across gateway processes.

When Redis does not answer (refused, timed out, erroring) the limiter never raises: it decides
by its policy, logs the outage once, counts it, and leaves Redis alone for `cooldown` seconds
before one request probes it again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from services.gateway.ratelimit import lua, lua_slices
from services.gateway.ratelimit.budget_upkeep import BudgetUpkeep
from services.gateway.ratelimit.counter_leases import CounterLeases, Taken, sliced_reservation
from services.gateway.ratelimit.global_lease import GlobalLease
from services.gateway.ratelimit.limits import (
    WINDOW_GRACE_MS,
    Check,
    Decision,
    Kind,
    Limits,
    LimitSubject,
    Origin,
    Reservation,
    reservation_for,
)
from services.gateway.ratelimit.local_limiter import LocalRateLimiter
from services.gateway.ratelimit.metrics import POLICIES, Policy, RateLimitMetrics
from services.gateway.ratelimit.outages import Outages
from services.gateway.ratelimit.planning import PlanCache, PreparedChecks, prepare, usage_plan
from services.gateway.ratelimit.verdicts import unavailable, verdict
from services.infra.pipelined_cluster import PipelinedCluster
from services.infra.pipelined_redis import PipelinedRedis

log = structlog.get_logger("ratelimit")

BudgetSpent = Callable[[LimitSubject, Sequence[Check]], Awaitable[Sequence[int]]]
"""What billing recorded against each budget check's scope in its period, in nano-dollars
(the gateway reads usage_records: services/gateway/budget_spend.py)."""

# OSError: a refused or reset socket can surface raw; TimeoutError: our own deadline.
_UNREACHABLE = (RedisError, OSError, TimeoutError)

_NOTHING = Reservation(lease_id="", origin=Origin.NONE, lease_key=None, token_windows=(),
                       tokens=0)


def connect_redis(url: str, *, timeout: float = 0.25,
                  max_connections: int | None = None) -> aioredis.Redis:
    """A client fit for the limiter: short socket timeouts and no automatic retries. redis-py
    retries timed-out commands by default, and a retried EVALSHA whose first run did reach
    Redis would count a request twice."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), max_connections=max_connections)


class RedisRateLimiter:
    """The gateway's rate limiter. `policy` says what happens while Redis is unreachable:
    `local` (per-process limits), `allow` (no limits) or `deny` (503).

    `timeout` bounds every Redis call whatever the client's own settings; `clock` (monotonic
    seconds) times the cool-down and `local` replaces the fallback limiter, both for tests."""

    def __init__(self, redis: aioredis.Redis | PipelinedRedis | PipelinedCluster, *,
                 policy: Policy = "local",
                 lease_ttl: float = 120.0, registry: CollectorRegistry | None = None,
                 cooldown: float = 1.0, timeout: float = 0.25,
                 local: LocalRateLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 budget_spent: BudgetSpent | None = None, slices: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if lease_ttl <= 0 or cooldown < 0 or timeout <= 0:
            raise ValueError("lease_ttl and timeout must be > 0, cooldown >= 0")
        self._redis = redis
        self._budget_spent = budget_spent
        self.policy: Policy = policy
        self._lease_ttl_ms = max(1, round(lease_ttl * 1000))
        self._cooldown = cooldown
        self._timeout = timeout
        self._clock = clock
        self._local = local if local is not None else LocalRateLimiter(lease_ttl=lease_ttl)
        registry = registry or CollectorRegistry()
        self.metrics = RateLimitMetrics(registry)
        self.global_lease = GlobalLease(self._run, registry, clock=clock)
        """This gateway's slices of the platform-wide request limit; `keep()` hands back what
        idles (the gateway runs it)."""
        self._outages = Outages(
            cooldown=cooldown, policy=policy, clock=clock,
            node_of=redis.node_of if isinstance(redis, PipelinedCluster) else None,
            live_nodes=redis.primaries if isinstance(redis, PipelinedCluster) else None)
        self._settling: set[asyncio.Future[None]] = set()
        self._to_settle: list[tuple[Reservation, int, int]] = []
        self._plans = PlanCache(slices=slices)
        self._usage_plans: dict[tuple[str, int | None], PreparedChecks] = {}
        # Lease ids only need to be unique, not secret: no getrandom syscall per request.
        self._ids = random.Random()
        # A client with its own deadlines (a pipelined one) spares us a timer per call.
        self._own_deadlines = isinstance(redis, PipelinedRedis | PipelinedCluster)
        # A script may only touch keys of one slot of a Redis Cluster: work for several
        # tenants (batched settles, reconciling) goes as one script per slot.
        self._slot: Callable[[str], int] = (
            redis.key_slot if isinstance(redis, PipelinedCluster) else lambda key: 0)
        self.counter_leases = CounterLeases(self._run, registry,
                                            lease_ttl_ms=self._lease_ttl_ms, slot=self._slot,
                                            clock=clock)
        """With `slices`, this gateway's slices of the request, token and concurrency limits;
        `keep()` hands back what idles and renews held slots (the gateway runs it)."""
        self._upkeep = BudgetUpkeep(self._evalsha, self._slot, self.metrics, timeout * 4)
        retry = redis.get_retry()
        if retry is not None and retry.get_retries() > 0:
            log.warning("rate limiter redis client retries commands: a retried EVALSHA can "
                        "count a request twice; build it with connect_redis()",
                        retries=retry.get_retries())

    @property
    def degraded(self) -> bool:
        """Whether Redis is currently considered unreachable."""
        return self._outages.degraded

    # ------------------------------------------------------------------- the API

    async def acquire(self, subject: LimitSubject, limits: Limits, estimated_tokens: int,
                      estimated_cost: int = 0, least_cost: int = 0) -> Decision:
        """Check every layer and, only if all pass, count the request, reserve
        `estimated_tokens` (and at each budget `estimated_cost` nano-dollars, or what is left
        when that is less and at least `least_cost`: `Reservation.money`) and take a lease:
        one EVALSHA (two more, seeding, on a budget's first request of a period)."""
        prepared = self._plans.prepared(subject, limits, estimated_tokens, estimated_cost,
                                        least_cost)
        if not prepared.checks:
            return Decision(allowed=True, layer=None, retry_after=0.0, headers={},
                            reservation=_NOTHING, degraded=False)
        decision = await self._acquire(prepared, limits, subject, estimated_tokens)
        if decision is not None:
            return decision
        # A budget's counter does not hold its period: seed it from billing's records, then
        # ask once more (a period that ends in between: refused for now, retried by the
        # client).
        if not await self._seed(subject, prepared):
            return self._unseeded()
        return await self._acquire(prepared, limits, subject, estimated_tokens) \
            or self._unseeded()

    async def _acquire(self, prepared: PreparedChecks, limits: Limits, subject: LimitSubject,
                       estimated_tokens: int) -> Decision | None:
        """The decision; None when a budget counter must be seeded first."""
        taken: Taken | None = None
        if prepared.sliced_at:
            # The slices first: spent locally, borrowed only when short.
            taken = await self.counter_leases.take(prepared.sliced)
            if taken is None:
                return self._outage(limits, subject, estimated_tokens)
            if not taken.allowed:
                return self._sliced_refusal(prepared, taken)
        shared = prepared.global_at >= 0
        if shared:
            # The platform-wide share: spent locally, borrowed only when none is held.
            global_check = prepared.checks[prepared.global_at]
            held = await self.global_lease.take(global_check)
            if not held:
                self._put_back(prepared, global_share=False)
                if held is None:
                    return self._outage(limits, subject, estimated_tokens)
                return self._global_refusal(global_check)
        lease_id = f"{self._ids.getrandbits(128):032x}" if prepared.lease else ""
        if prepared.keys:
            args: list[str | int] = [lease_id, self._lease_ttl_ms, WINDOW_GRACE_MS,
                                     prepared.spec]
            if prepared.least:
                args.append(prepared.least)
            done, reply = await self._run(lua.ACQUIRE, prepared.keys, args)
        else:  # slices alone
            done, reply = True, (1, int(time.time() * 1000), 0)
        if not done or int(reply[0]) == -1:
            self._put_back(prepared)
            return None if done else self._outage(limits, subject, estimated_tokens)
        decision = self._judged(prepared, lease_id, reply, taken)
        if not decision.allowed:
            self._put_back(prepared)  # refused elsewhere: all or nothing
        return decision

    def _put_back(self, prepared: PreparedChecks, *, global_share: bool = True) -> None:
        if prepared.sliced_at:
            self.counter_leases.put_back(prepared.sliced)
        if global_share and prepared.global_at >= 0:
            self.global_lease.put_back()

    def _sliced_refusal(self, prepared: PreparedChecks, taken: Taken) -> Decision:
        result = verdict(prepared.sliced, taken.used, int(time.time() * 1000), committed=False)
        if result.layer is not None:
            self.metrics.exceeded.labels(str(result.layer)).inc()
        return Decision(allowed=False, layer=result.layer, retry_after=result.retry_after,
                        headers=result.headers, reservation=None, degraded=False)

    def _outage(self, limits: Limits, subject: LimitSubject, estimated_tokens: int) -> Decision:
        if limits.budgets:
            # A budget is a promise across every gateway: per-process counting (or none)
            # could overshoot it N times, so without Redis a request under one waits.
            return self._fallback(None)
        return self._fallback(lambda: self._local.decide(subject, limits, estimated_tokens))

    def _global_refusal(self, check: Check) -> Decision:
        assert check.limit is not None
        result = verdict((check,), (check.limit,), int(time.time() * 1000), committed=False)
        self.metrics.exceeded.labels(str(check.layer)).inc()
        return Decision(allowed=False, layer=result.layer, retry_after=result.retry_after,
                        headers=result.headers, reservation=None, degraded=False)

    async def _seed(self, subject: LimitSubject, prepared: PreparedChecks) -> bool:
        money = [c for c in prepared.checks if c.kind is Kind.MONEY]
        if self._budget_spent is None or not money:
            return False
        try:
            spent = await self._budget_spent(subject, money)
        except Exception as exc:  # the records are out of reach: the budget cannot be known
            log.warning("budget spend could not be read from billing's records",
                        error=str(exc)[:200])
            return False
        args: list[str | int] = [WINDOW_GRACE_MS]
        for check, nano in zip(money, spent, strict=True):
            args += [check.window_ms, nano]
        done, added = await self._run(lua.SEED, [c.key for c in money], args)
        if done and int(added):
            self.metrics.budget_drift.labels("seed").inc(int(added))
        return done

    def _unseeded(self) -> Decision:
        result = unavailable(1.0)
        return Decision(allowed=False, layer=result.layer, retry_after=result.retry_after,
                        headers=result.headers, reservation=None, degraded=True)

    async def reconcile(self, checks: Sequence[Check], spent: Sequence[int]) -> list[int]:
        """BudgetUpkeep.reconcile, through this limiter's client."""
        return await self._upkeep.reconcile(checks, spent)

    async def sweep(self, lease_key: str, members: Sequence[str]) -> int:
        """BudgetUpkeep.sweep, through this limiter's client."""
        return await self._upkeep.sweep(lease_key, members)

    async def acquire_usage(self, subject: LimitSubject, per_minute: int | None) -> Decision:
        """GET /v1/usage's own per-key limit (`usage_plan`), counted apart from inference:
        one EVALSHA, the same verdict, headers and outage policy as `acquire`."""
        prepared = self._usage_plan(subject, per_minute)
        if not prepared.checks:
            return Decision(allowed=True, layer=None, retry_after=0.0, headers={},
                            reservation=_NOTHING, degraded=False)
        args: list[str | int] = ["", self._lease_ttl_ms, WINDOW_GRACE_MS, prepared.spec]
        done, reply = await self._run(lua.ACQUIRE, prepared.keys, args)
        if not done:
            return self._fallback(lambda: self._local.decide_checks(prepared.checks))
        return self._judged(prepared, "", reply)

    def _usage_plan(self, subject: LimitSubject, per_minute: int | None) -> PreparedChecks:
        key = (subject.key_id, per_minute)
        found = self._usage_plans.get(key)
        if found is None:
            if len(self._usage_plans) >= 10_000:
                self._usage_plans.clear()
            found = self._usage_plans[key] = prepare(usage_plan(subject, per_minute))
        return found

    def _judged(self, prepared: PreparedChecks, lease_id: str, reply: Any,
                taken: Taken | None = None) -> Decision:
        checks = prepared.checks
        allowed, now_ms, grant, *counted = (int(x) for x in reply)
        used = counted
        if prepared.global_at >= 0 or taken is not None:
            used = [0] * len(checks)
            for j, i in enumerate(prepared.counted_at):
                used[i] = counted[j]
        if prepared.global_at >= 0:
            # Its share was taken: as used as the platform-wide limit is, as far as known here.
            limit = checks[prepared.global_at].limit or 0
            used[prepared.global_at] = max(0, limit - 1 - self.global_lease.share.remaining())
        if taken is not None:
            for j, i in enumerate(prepared.sliced_at):
                used[i] = taken.used[j]
        result = verdict(checks, used, now_ms, committed=allowed == 1)
        if not result.allowed and result.layer is not None:
            self.metrics.exceeded.labels(str(result.layer)).inc()
        elif result.allowed:
            self._observe_remaining(result.headers)
        reservation = None
        if result.allowed:
            reservation = reservation_for(prepared.counted if taken else checks, now_ms,
                                          lease_id, Origin.REDIS, grant)
            if taken is not None:
                reservation = sliced_reservation(reservation, prepared.sliced, taken)
        return Decision(allowed=result.allowed, layer=result.layer,
                        retry_after=result.retry_after, headers=result.headers,
                        reservation=reservation, degraded=False)

    def _observe_remaining(self, headers: dict[str, str]) -> None:
        limit = headers.get("x-ratelimit-limit-requests")
        if limit:
            self.metrics.remaining_requests.observe(
                int(headers["x-ratelimit-remaining-requests"]) / max(1, int(limit)))
        limit = headers.get("x-ratelimit-limit-tokens")
        if limit:
            self.metrics.remaining_tokens.observe(
                int(headers["x-ratelimit-remaining-tokens"]) / max(1, int(limit)))

    async def settle(self, reservation: Reservation, actual_tokens: int,
                     actual_cost: int = 0) -> None:
        """Correct the reserved tokens to `actual_tokens` in the windows they were reserved in
        (dropped if a window has ended) and release the lease. Idempotent; one EVALSHA. When
        Redis is down the settlement is dropped: the estimate stands and the lease expires."""
        if reservation.origin is Origin.LOCAL:
            self._local.settle_now(reservation, actual_tokens, actual_cost)
            return
        if reservation.sliced is not None:
            self.counter_leases.settle(reservation.sliced, actual_tokens)
        if reservation.origin is not Origin.REDIS or reservation.lease_key is None:
            return
        counters = (*reservation.token_windows, *reservation.money_windows)
        keys = [reservation.lease_key, *(w.key for w in counters)]
        args: list[str | int] = [reservation.lease_id,
                                 max(0, actual_tokens) - reservation.tokens,
                                 max(0, actual_cost) - reservation.money,
                                 len(reservation.token_windows),
                                 *(w.start_ms for w in counters)]
        await self._run(lua.SETTLE, keys, args)

    def settle_nowait(self, reservation: Reservation, actual_tokens: int,
                      actual_cost: int = 0) -> None:
        """`settle` without waiting for Redis's answer, for when the response has already
        gone. With PipelinedRedis, the settles of every request that ends in this turn of the
        event loop go as one EVALSHA (SETTLE_MANY) on the next write, with no task at all."""
        if reservation.sliced is not None:
            self.counter_leases.settle(reservation.sliced, actual_tokens)
            if reservation.lease_key is None:
                return
        if (reservation.origin is Origin.REDIS and reservation.lease_key is not None
                and isinstance(self._redis, PipelinedRedis | PipelinedCluster)
                and not self._outages.is_down(reservation.lease_key)):
            self._to_settle.append((reservation, actual_tokens, actual_cost))
            if len(self._to_settle) == 1:
                asyncio.get_running_loop().call_soon(self._send_settles)
            return
        self._background(self.settle(reservation, actual_tokens, actual_cost))

    def _send_settles(self) -> None:
        batch, self._to_settle = self._to_settle, []
        if not batch:
            return
        by_slot: dict[int, list[tuple[Reservation, int, int]]] = {}
        for settle in batch:
            assert settle[0].lease_key is not None
            by_slot.setdefault(self._slot(settle[0].lease_key), []).append(settle)
        for settles in by_slot.values():
            self._send_settle_many(settles)

    def _send_settle_many(self, batch: list[tuple[Reservation, int, int]]) -> None:
        assert isinstance(self._redis, PipelinedRedis | PipelinedCluster)
        keys: list[str] = []
        args: list[str | int] = [len(batch)]
        for reservation, actual, cost in batch:
            assert reservation.lease_key is not None
            counters = (*reservation.token_windows, *reservation.money_windows)
            keys.append(reservation.lease_key)
            keys += [w.key for w in counters]
            args += [1 + len(counters), reservation.lease_id,
                     max(0, actual) - reservation.tokens, max(0, cost) - reservation.money,
                     len(reservation.token_windows)]
            args += [w.start_ms for w in counters]
        sent = self._redis.execute_nowait("EVALSHA", lua.SETTLE_MANY.sha, len(keys), *keys,
                                          *args)

        def settle_slowly(done: asyncio.Future[Any] | None = None) -> None:
            # Redis lost its scripts (restart, SCRIPT FLUSH), or the connection is gone:
            # settle one by one the slow way, which loads scripts and counts outages.
            # Settling is idempotent, so a retry is safe.
            if done is None or (not done.cancelled()
                                and isinstance(done.exception(), NoScriptError)):
                for reservation, actual, cost in batch:
                    self._background(self.settle(reservation, actual, cost))

        if sent is None:
            settle_slowly()
        else:
            sent.add_done_callback(settle_slowly)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def load_scripts(self) -> bool:
        """Load every script now (at start-up) so fire-and-forget settles never meet
        NOSCRIPT; False when Redis is unreachable (they load on first use instead)."""
        try:
            for script in (lua.ACQUIRE, lua.SETTLE, lua.SETTLE_MANY, lua.RENEW, lua.SEED,
                           lua.RECONCILE, lua.SWEEP, lua_slices.BORROW_MANY,
                           lua_slices.GIVE_BACK_MANY,
                           lua_slices.RENEW_SLOTS, lua_slices.GIVE_BACK_SLOTS):
                await self._redis.script_load(script.source)
        except _UNREACHABLE:
            return False
        return True

    async def release(self, reservation: Reservation) -> None:
        """The request consumed nothing (it never reached a node): give back its tokens and
        its lease. The request itself stays counted."""
        await self.settle(reservation, 0)

    async def renew(self, reservation: Reservation) -> bool:
        """Extend the lease by `lease_ttl` from now; long streams call it periodically. False
        only when the store says the lease is gone (expired or settled): a lapsed lease is
        not revived. While Redis is unreachable the lease is assumed held."""
        if reservation.origin is Origin.LOCAL:
            return self._local.renew_now(reservation)
        if reservation.origin is not Origin.REDIS or reservation.lease_key is None:
            return True
        done, reply = await self._run(lua.RENEW, [reservation.lease_key],
                                      [reservation.lease_id, self._lease_ttl_ms])
        return not done or int(reply) == 1

    # ------------------------------------------------------------------- Redis and outages

    async def _run(self, script: lua.Script, keys: Sequence[str],
                   args: Sequence[str | int]) -> tuple[bool, Any]:
        """(True, reply), or (False, None) when Redis (the primary holding the keys) was
        skipped or failed."""
        outage = self._outages.of(keys[0])
        probe = self._outages.admit(outage)
        if probe is None:
            return False, None
        try:
            if self._own_deadlines:
                reply = await self._evalsha(script, keys, args)
            else:
                async with asyncio.timeout(self._timeout):
                    reply = await self._evalsha(script, keys, args)
        except _UNREACHABLE as exc:
            self.metrics.redis_errors.inc()
            self._outages.failed(outage, exc)
            return False, None
        finally:
            if probe:
                self._outages.done(outage)
        self._outages.recovered(outage)
        return True, reply

    async def _evalsha(self, script: lua.Script, keys: Sequence[str],
                       args: Sequence[str | int]) -> Any:
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH: load once, then EVALSHA works again.
            await self._redis.script_load(script.source)
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)

    def _fallback(self, decide_locally: Callable[[], Decision] | None) -> Decision:
        """What the policy says without Redis; `decide_locally` None: deny whatever the
        policy (a request under a budget)."""
        self._outages.fallbacks += 1
        self.metrics.fallback.labels(self.policy).inc()
        if self.policy == "allow" and decide_locally is not None:
            return Decision(allowed=True, layer=None, retry_after=0.0, headers={},
                            reservation=_NOTHING, degraded=True)
        if self.policy == "deny" or decide_locally is None:
            result = unavailable(max(self._cooldown, 1.0))
            return Decision(allowed=False, layer=result.layer, retry_after=result.retry_after,
                            headers=result.headers, reservation=None, degraded=True)
        decision = decide_locally()
        if not decision.allowed and decision.layer is not None:
            self.metrics.exceeded.labels(str(decision.layer)).inc()
        return decision
