"""Spend budgets on the admin API (issue 21, work in progress): set, read, list and clear on a
tenant, an environment and a key, each change an event; and billing's watch announcing 50%,
80% and 100% of a period once each."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from services.billing.budget_watch import BudgetWatch, due_thresholds
from services.core.budgets import Period, period_bounds
from services.core.catalog import Catalog
from services.core.eventlog import EventLog
from tests.integration.test_admin_api import TOKEN, Admin, assert_error, seed
from tests.integration.test_admin_api import admin as admin
from tests.integration.test_billing_stripe import BillingRig, usage
from tests.integration.test_billing_stripe import rig as rig
from tests.integration.test_cli_admin import Cli, base_env


async def test_budgets_are_set_read_listed_and_cleared(admin: Admin,
                                                       pool: asyncpg.Pool) -> None:
    tenant, env, key = await seed(admin)
    paths = {"tenant": f"/tenants/{tenant['id']}/budget",
             "environment": f"/environments/{env['id']}/budget",
             "key": f"/keys/{key['id']}/budget"}
    await admin.ok("GET", paths["tenant"], status=404)
    set_ = await admin.ok("PUT", paths["tenant"], {"amount": "250", "period": "month"})
    start, end = period_bounds(Period("month"), datetime.now(UTC))
    assert (set_["amount"], set_["period"]) == ("250.000000000", "month")
    assert datetime.fromisoformat(set_["period_end"]) == end
    assert datetime.fromisoformat(set_["period_start"]) == start
    await admin.ok("PUT", paths["environment"], {"amount": "0.5", "period": "day"})
    await admin.ok("PUT", paths["key"], {"amount": "0", "period": "day"})  # a paused key
    again = await admin.ok("PUT", paths["tenant"], {"amount": "300.25", "period": "month"})
    assert again["amount"] == "300.250000000"
    listed = await admin.ok("GET", f"/tenants/{tenant['id']}/budgets")
    assert {b["scope"]: b["amount"] for b in listed["data"]} == {
        "tenant": "300.250000000", "environment": "0.500000000", "key": "0.000000000"}
    await admin.ok("DELETE", paths["key"], status=204)
    await admin.ok("GET", paths["key"], status=404)
    status, answer = await admin.call("DELETE", paths["key"])
    assert status == 404 and "Budget of key" in assert_error(answer, "not_found_error")
    types = [r["type"] for r in await pool.fetch(
        "SELECT type FROM events WHERE type LIKE 'budget.%' ORDER BY position")]
    assert types == ["budget.set"] * 4 + ["budget.cleared"]
    # Set again after clearing: the stream carries on.
    await admin.ok("PUT", paths["key"], {"amount": "1", "period": "day"})
    status, answer = await admin.call("PUT", f"/keys/{uuid.uuid4()}/budget",
                                      {"amount": "1", "period": "day"})
    assert status == 404 and "Key " in assert_error(answer, "not_found_error")
    status, answer = await admin.call("PUT", paths["tenant"],
                                      {"amount": "1.0000000001", "period": "day"})
    assert status == 400
    assert_error(answer, "invalid_request_error", "amount")


def test_thresholds_are_announced_in_order_each_once() -> None:
    budget = Decimal("10")
    assert due_thresholds(budget, Decimal("4.99"), 0) == []
    assert due_thresholds(budget, Decimal("5"), 0) == [50]
    assert due_thresholds(budget, Decimal("9.99"), 1) == [80]
    assert due_thresholds(budget, Decimal("12"), 0) == [50, 80, 100]
    assert due_thresholds(budget, Decimal("12"), 3) == []
    assert due_thresholds(Decimal(0), Decimal(0), 0) == [50, 80, 100]


async def test_billing_announces_each_threshold_once_per_period(rig: BillingRig) -> None:
    tenant = await rig.tenant("acme", linked=False)
    catalog = Catalog(EventLog(rig.pool), actor="test")
    # The rig's model: $0.15 / $0.60 per million tokens.
    await catalog.set_budget("tenant", tenant, Decimal("0.001"), Period("day"))
    watch = BudgetWatch(rig.pool, interval=3600)
    now = datetime.now(UTC)
    start, _ = period_bounds(Period("day"), now)
    at = max(start, now - timedelta(minutes=5))
    await rig.record([usage(tenant, at, 4000, 0)])  # $0.0006: 60%
    [first] = await watch.check_once(now)
    assert first.type == "budget.threshold_reached" and first.threshold == 50  # type: ignore[attr-defined]
    assert await watch.check_once(now) == []  # once
    await rig.record([usage(tenant, at, 1000, 1000)])  # + $0.00075: 135%
    later = await watch.check_once(now)
    assert [e.type for e in later] == ["budget.threshold_reached", "budget.exhausted"]
    assert await BudgetWatch(rig.pool, interval=3600).check_once(now) == []  # a replica too
    # The next period starts over.
    tomorrow = await watch.check_once(now + timedelta(days=1))
    assert tomorrow == []  # nothing spent there yet
    stored = await rig.pool.fetch(
        "SELECT type, data->>'tenant_id' AS tenant FROM events WHERE type LIKE 'budget.%' "
        "AND type <> 'budget.set' ORDER BY position")
    assert [(r["type"], r["tenant"]) for r in stored] == [
        ("budget.threshold_reached", str(tenant)), ("budget.threshold_reached", str(tenant)),
        ("budget.exhausted", str(tenant))]


async def test_cli_budgets(admin: Admin, tmp_path: Path) -> None:
    tenant, env, _ = await seed(admin)
    cli = Cli({**base_env(tmp_path), "CROSSLOGIC_ADMIN_URL": admin.url,
               "CROSSLOGIC_ADMIN_TOKEN": TOKEN})
    shown = json.loads(await cli.ok("budgets", "set", "environment", env["id"], "12.5",
                                    "--period", "day", "--json"))
    assert (shown["amount"], shown["period"]) == ("12.500000000", "day")
    listed = await cli.ok("budgets", "list", tenant["id"])
    assert "environment" in listed and "12.500000000" in listed
    await cli.ok("budgets", "clear", "environment", env["id"])
    code, _, err = await cli.run("budgets", "show", "environment", env["id"])
    assert code != 0 and "not found" in err
