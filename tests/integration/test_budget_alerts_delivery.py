"""Budget alerts end to end (issue 21): billing's watcher appends `budget.threshold_reached`
(50, 80) and `budget.exhausted` to the log once per budget and period; the real outbox relay
(with the relay's own NATS credential) publishes them on CONTROL; the real notifier delivers
them, signed, to the tenant's `budget.*` webhook over real HTTP, and to nobody else's.

Usage is what billing recorded: published on USAGE and written to `usage_records` (and
`usage_hourly`) by a real billing service (`rig.record`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import asyncpg
import pytest

from schemas.events import BudgetExhausted, BudgetThresholdReached, UsageRecorded
from services.billing.budget_watch import BudgetWatch, alert_stream, due_thresholds
from services.domain.budgets import Period, period_bounds
from services.domain.notifications import Notifications
from services.domain.notifications.targets import generate_signing_secret
from services.infra.bus import Bus
from services.infra.eventlog import EventLog
from services.infra.log_waker import LogWaker
from services.infra.natsauth.identities import Role
from services.infra.relay import OutboxRelay
from tests.conftest import Servers
from tests.doubles.webhook_receivers import Endpoint, WebhookReceivers
from tests.helpers import eventually
from tests.integration.test_billing_stripe import MODEL, BillingRig, usage
from tests.integration.test_billing_stripe import rig as rig
from tests.integration.test_notifier_delivery import drained, running_notifier
from tests.integration.test_notifier_delivery import receivers as receivers

DEADLINE = 60.0
"""Seconds to wait for a delivery: generous, for a busy two-core machine."""


@pytest.fixture
async def relay(servers: Servers, pool: asyncpg.Pool, bus: Bus) -> AsyncIterator[OutboxRelay]:
    """The outbox relay, connected to NATS as the relay (its permissions, not the admin's)."""
    waker = LogWaker(servers.database_url, poll_interval=0.2)
    await waker.start()
    relay_bus = await Bus.connect(servers.nats_url, name="relay",
                                  creds=servers.creds(Role.RELAY))
    found = OutboxRelay(servers.database_url, relay_bus, waker=waker, leader_retry=0.1)
    task = asyncio.create_task(found.run())
    try:
        yield found
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await waker.close()
        await relay_bus.close()


async def relayed(pool: asyncpg.Pool) -> None:
    """Until the relay's checkpoint has passed every event appended to the log."""
    async def caught_up() -> bool:
        last = await pool.fetchval("SELECT max(position) FROM events WHERE origin = 'log'")
        done = await pool.fetchval(
            "SELECT position FROM checkpoints WHERE name = 'outbox-relay'")
        return last is None or (done is not None and done >= last)

    await eventually(caught_up, timeout=DEADLINE, what="relay caught up")


async def race(watchers: list[BudgetWatch], now: datetime, expected: list[str],
               rounds: int = 3) -> None:
    """Every watcher at once, several times: together they announce at most `expected`, each
    at most once. (Another may have announced some: the watcher of the billing that records
    the usage looks too, at its start.)"""
    said: list[str] = []
    for _ in range(rounds):
        for found in await asyncio.gather(*(w.check_once(now) for w in watchers)):
            said += [describe(e.type, getattr(e, "threshold", None)) for e in found]
    assert len(said) == len(set(said)) and set(said) <= set(expected), said


async def announced(pool: asyncpg.Pool, scope_id: uuid.UUID, start: datetime) -> list[str]:
    """What the log holds for the budget's period, in log order."""
    rows = await pool.fetch(
        "SELECT type, data->>'threshold' AS threshold FROM events WHERE stream = $1 "
        "ORDER BY position", f"budget_alert:{alert_stream(scope_id, start)}")
    return [describe(r["type"], r["threshold"]) for r in rows]


def describe(event_type: str, threshold: Any) -> str:
    return f"{event_type}:{threshold}" if threshold is not None else event_type


def heard(endpoint: Endpoint) -> list[tuple[str, datetime]]:
    """What the endpoint accepted: (type and threshold, period start), in arrival order."""
    return [(describe(r.json["type"], r.json["data"].get("threshold")),
             datetime.fromisoformat(r.json["data"]["period_start"]))
            for r in endpoint.delivered]


ALL = ["budget.threshold_reached:50", "budget.threshold_reached:80", "budget.exhausted"]


async def test_budget_alerts_reach_the_tenant_s_webhook_once_per_period(
        rig: BillingRig, relay: OutboxRelay, receivers: WebhookReceivers) -> None:
    pool = rig.pool
    acme = await rig.tenant("acme", linked=False)
    other = await rig.tenant("other", linked=False)
    # The rig's model: $0.15 / $0.60 per million tokens; a budget of a tenth of a cent a day.
    for tenant in (acme, other):
        await rig.catalog.set_budget("tenant", tenant, Decimal("0.001"), Period("day"))
    notifications = Notifications(EventLog(pool), actor="test")
    endpoints: dict[uuid.UUID, Endpoint] = {}
    for tenant in (acme, other):
        secret = generate_signing_secret()
        endpoints[tenant] = receivers.generic(secret)
        await notifications.create_subscription(
            kind="generic", target=endpoints[tenant].url, event_types=["budget.*"],
            tenant_id=tenant, signing_secret=secret)
    acme_hook, other_hook = endpoints[acme], endpoints[other]
    watchers = [BudgetWatch(pool, interval=3600), BudgetWatch(pool, interval=3600)]
    now = datetime.now(UTC)
    start, end = period_bounds(Period("day"), now)
    tomorrow = now + timedelta(days=1)
    next_start, _ = period_bounds(Period("day"), tomorrow)
    assert next_start == end

    async with running_notifier(rig.servers):
        # Today: 60%, then 135%.
        await rig.record([usage(acme, start + timedelta(minutes=30), 4000, 0)])
        await race(watchers, now, ALL[:1])
        assert await announced(pool, acme, start) == ALL[:1]
        await rig.record([usage(acme, start + timedelta(hours=2, minutes=5), 1000, 1000)])
        await race(watchers, now, ALL[1:])
        assert await announced(pool, acme, start) == ALL
        await acme_hook.wait_for(3, delivered=True, timeout=DEADLINE)

        # Tomorrow (a watcher's look at the next period): today's spend does not count...
        await race(watchers, tomorrow, [], rounds=1)
        assert await announced(pool, acme, next_start) == []
        # ...tomorrow's does, and the thresholds open again.
        await rig.record([usage(acme, next_start + timedelta(hours=1), 1000, 1000),
                          usage(acme, next_start + timedelta(hours=3, minutes=59), 4000, 0)])
        await race(watchers, tomorrow, ALL)
        assert await announced(pool, acme, next_start) == ALL
        await acme_hook.wait_for(6, delivered=True, timeout=DEADLINE)

        # Nothing more however often they look, and nothing pending anywhere.
        await race(watchers, now, [])
        await race(watchers, tomorrow, [])
        await relayed(pool)
        await drained(rig.bus)

    got = heard(acme_hook)
    assert len(acme_hook.received) == 6  # each accepted the first time: no retries either
    assert got[0] == (ALL[0], start)  # announced before the rest
    assert sorted(got[:3]) == sorted((t, start) for t in ALL)
    assert sorted(got[3:]) == sorted((t, next_start) for t in ALL)
    bodies = [r.json["data"] for r in acme_hook.delivered]
    assert {b["tenant_id"] for b in bodies} == {str(acme)}
    assert {(b["scope"], b["scope_id"]) for b in bodies} == {("tenant", str(acme))}
    assert len({r.headers["webhook-id"] for r in acme_hook.delivered}) == 6
    assert other_hook.received == []
    queued = await pool.fetch(
        "SELECT subscription_id, count(*) AS n FROM notification_deliveries GROUP BY 1")
    assert sorted(r["n"] for r in queued) == [6]  # all to acme's subscription, none to other's
    logged = await pool.fetchval(
        "SELECT count(*) FROM events WHERE type IN ('budget.threshold_reached', "
        "'budget.exhausted')")
    assert logged == 6


# --------------------------------------------------------------------------- many budgets


class CountingPool:
    """A pool that counts the queries made on it directly (not through acquire())."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.pool, name)
        if name in ("fetch", "fetchval", "fetchrow", "execute", "executemany"):
            self.queries += 1
        return found


async def recorded(pool: asyncpg.Pool, scope: str, scope_id: uuid.UUID,
                   period: Period, now: datetime) -> Decimal:
    """The spend of a scope in the period holding `now`, added up from usage_records alone
    (one query per scope: the slow, obvious way)."""
    column = {"tenant": "tenant_id", "environment": "environment_id", "key": "api_key_id"}
    start, end = period_bounds(period, now)
    total = await pool.fetchval(
        f"SELECT coalesce(sum(cost), 0) FROM usage_records WHERE {column[scope]} = $1 "
        "AND occurred_at >= $2 AND occurred_at < $3", scope_id, start, end)
    return Decimal(total)


async def test_fifty_budgets_are_each_judged_on_their_own_spend(rig: BillingRig) -> None:
    pool, catalog = rig.pool, rig.catalog
    now = datetime.now(UTC).replace(microsecond=0)
    # Periods of two days with ragged edges: one started at 37 minutes past an hour, one
    # ends a second from now (its last, partial hour is this one).
    periods = [Period("day"), Period("days", 2, now - timedelta(hours=30, minutes=37)),
               Period("month"), Period("days", 2, now + timedelta(seconds=1, days=-2))]
    scopes: list[tuple[str, uuid.UUID, Period]] = []
    records: list[UsageRecorded] = []
    n = 0
    for t in range(5):
        tenant = await catalog.create_tenant(f"tenant-{t}")
        scopes.append(("tenant", tenant, periods[t % 4]))
        for e in range(3):
            env = await catalog.create_environment(tenant, f"env-{e}", "us-east-1")
            scopes.append(("environment", env, periods[(t + e + 1) % 4]))
            for k in range(2):
                key = (await catalog.create_api_key(env, name=f"key-{k}")).key_id
                scopes.append(("key", key, periods[(t + e + k + 2) % 4]))
                # Usage seconds ago (this partial hour), then every 47 minutes or so over
                # the last 36 hours, some of it before each period started; and some stamped
                # two hours ahead (a gateway's clock), after one period's end. Tenant 4's
                # second keys spend nothing.
                for j in range(0 if t == 4 and k == 1 else 7):
                    n += 1
                    minutes = 0 if j == 0 else -120 if j == 6 else 47 * ((n * 7 + j) % 46)
                    at = now - timedelta(minutes=minutes, seconds=1 + n % 5)
                    records.append(UsageRecorded(
                        request_id=f"req-{n}", tenant_id=tenant, environment_id=env,
                        api_key_id=key, model=MODEL, endpoint="chat", region="us-east-1",
                        node_id=None, prompt_tokens=1000 + 37 * n,
                        completion_tokens=200 + 11 * n, latency_ms=10.0, occurred_at=at))
    assert len(scopes) == 50
    await rig.record(records)
    # Each budget a multiple of its own spend: far past it, exactly it, 67%, 83%, 33%.
    factors = [Decimal("0.4"), Decimal(1), Decimal("1.5"), Decimal("1.2"), Decimal(3)]
    for i, (scope, scope_id, period) in enumerate(scopes):
        spent = await recorded(pool, scope, scope_id, period, now)
        amount = (spent * factors[i % len(factors)]).quantize(Decimal("0.000000001"))
        await catalog.set_budget(scope, scope_id, amount, period)  # type: ignore[arg-type]

    expected: dict[uuid.UUID, tuple[list[int], Decimal]] = {}
    for b in await pool.fetch("SELECT * FROM budgets"):
        spent = await recorded(pool, b["scope"], b["scope_id"],
                               Period(b["period"], b["every_days"], b["anchor"]), now)
        expected[b["scope_id"]] = (due_thresholds(b["amount"], spent, 0), spent)
    assert len({tuple(due) for due, _ in expected.values()}) == 4  # [], [50], [50, 80], all

    events = await BudgetWatch(pool, interval=3600).check_once(now)
    got: dict[uuid.UUID, tuple[list[int], Decimal]] = {s: ([], Decimal(-1)) for s in expected}
    for event in events:
        alert = cast(BudgetThresholdReached | BudgetExhausted, event)
        got[alert.scope_id][0].append(getattr(alert, "threshold", 100))
        got[alert.scope_id] = (got[alert.scope_id][0], alert.spent)
    for scope_id, (due, spent) in expected.items():
        assert got[scope_id][0] == due, scope_id
        if due:
            assert got[scope_id][1] == spent, scope_id
    # A look that finds nothing due reads every budget's spend in a handful of queries.
    counting = CountingPool(pool)
    assert await BudgetWatch(cast(asyncpg.Pool, counting), interval=3600).check_once(now) == []
    assert counting.queries <= 4
