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
from services.domain.budgets import Period, period_bounds
from services.domain.catalog import Catalog
from services.infra.eventlog import EventLog
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


async def test_a_budget_resets_every_n_days_from_its_anchor(admin: Admin,
                                                             pool: asyncpg.Pool) -> None:
    tenant, env, key = await seed(admin)
    path = f"/environments/{env['id']}/budget"
    # Any offset: kept in UTC; the anchor may be past or future (periods count both ways).
    body = {"amount": "40", "period": "days", "every_days": 7,
            "anchor": "2030-12-01T09:30:00+02:00"}
    set_ = await admin.ok("PUT", path, body)
    anchor = datetime(2030, 12, 1, 7, 30, tzinfo=UTC)
    start, end = period_bounds(Period("days", 7, anchor), datetime.now(UTC))
    assert (set_["period"], set_["every_days"]) == ("days", 7)
    assert datetime.fromisoformat(set_["anchor"]) == anchor
    assert datetime.fromisoformat(set_["period_start"]) == start
    assert datetime.fromisoformat(set_["period_end"]) == end
    assert end - start == timedelta(days=7)
    assert await admin.ok("GET", path) == set_
    [event] = await pool.fetch("SELECT data FROM events WHERE type = 'budget.set'")
    data = event["data"]
    assert (data["period"], data["every_days"]) == ("days", 7)
    assert datetime.fromisoformat(data["anchor"]) == anchor
    # day and month show neither; setting one replaces the custom period.
    month = await admin.ok("PUT", path, {"amount": "40", "period": "month"})
    assert (month["every_days"], month["anchor"]) == (None, None)
    # A one-day period from an anchor in the past, listed with the others.
    await admin.ok("PUT", f"/keys/{key['id']}/budget",
                   {"amount": "1", "period": "days", "every_days": 1,
                    "anchor": "2020-02-29T12:00:00Z"})
    listed = await admin.ok("GET", f"/tenants/{tenant['id']}/budgets")
    by_scope = {b["scope"]: b for b in listed["data"]}
    assert by_scope["key"]["every_days"] == 1 and by_scope["environment"]["anchor"] is None
    start, end = period_bounds(Period("days", 1, datetime(2020, 2, 29, 12, tzinfo=UTC)),
                               datetime.now(UTC))
    assert datetime.fromisoformat(by_scope["key"]["period_start"]) == start
    assert start.hour == 12 and end - start == timedelta(days=1)


async def test_an_anchor_utc_cannot_hold_moves_by_one_period(admin: Admin) -> None:
    """0001-01-01T00:00:00+05:00 is in year 0 in UTC: the same resets, one period on."""
    _, env, _ = await seed(admin)
    set_ = await admin.ok("PUT", f"/environments/{env['id']}/budget",
                          {"amount": "1", "period": "days", "every_days": 3,
                           "anchor": "0001-01-01T00:00:00+05:00"})
    assert datetime.fromisoformat(set_["anchor"]) == datetime(1, 1, 3, 19, tzinfo=UTC)
    set_ = await admin.ok("PUT", f"/environments/{env['id']}/budget",
                          {"amount": "1", "period": "days", "every_days": 3,
                           "anchor": "9999-12-31T23:00:00-05:00"})
    assert datetime.fromisoformat(set_["anchor"]) == datetime(9999, 12, 29, 4, tzinfo=UTC)


async def test_a_period_of_days_needs_its_fields_and_only_it(admin: Admin,
                                                             pool: asyncpg.Pool) -> None:
    tenant, _, _ = await seed(admin)
    path = f"/tenants/{tenant['id']}/budget"
    anchor = "2026-12-01T00:00:00Z"
    cases = [
        ({"amount": "1", "period": "days", "every_days": 7}, "anchor", "needs"),
        ({"amount": "1", "period": "days", "anchor": anchor}, "every_days", "needs"),
        ({"amount": "1", "period": "month", "anchor": anchor}, "anchor", "only for"),
        ({"amount": "1", "period": "day", "every_days": 7}, "every_days", "only for"),
        ({"amount": "1", "period": "days", "every_days": 0, "anchor": anchor}, "every_days",
         ">= 1"),
        ({"amount": "1", "period": "days", "every_days": 367, "anchor": anchor},
         "every_days", "<= 366"),
        ({"amount": "1", "period": "days", "every_days": 7.0, "anchor": anchor},
         "every_days", "int"),
        ({"amount": "1", "period": "days", "every_days": 7,
          "anchor": "2026-12-01T00:00:00"}, "anchor", "timezone"),
        ({"amount": "1", "period": "days", "every_days": 7, "anchor": "2026-12-01"},
         "anchor", "datetime"),
        ({"amount": "1", "period": "week"}, "period", "week"),
    ]
    for body, param, said in cases:
        status, answer = await admin.call("PUT", path, body)
        assert status == 400, (body, answer)
        assert said in assert_error(answer, "invalid_request_error", param), (body, answer)
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'budget.set'") == 0


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
    shown = json.loads(await cli.ok("budgets", "set", "tenant", tenant["id"], "100",
                                    "--period", "days", "--every-days", "14",
                                    "--anchor", "2026-12-01T00:00:00Z", "--json"))
    anchor = datetime(2026, 12, 1, tzinfo=UTC)
    start, _ = period_bounds(Period("days", 14, anchor), datetime.now(UTC))
    assert (shown["period"], shown["every_days"]) == ("days", 14)
    assert datetime.fromisoformat(shown["anchor"]) == anchor
    assert datetime.fromisoformat(shown["period_start"]) == start
    code, _, err = await cli.run("budgets", "set", "tenant", tenant["id"], "100",
                                 "--period", "days", "--every-days", "14")
    assert code != 0 and "anchor" in err
    code, _, err = await cli.run("budgets", "set", "tenant", tenant["id"], "100",
                                 "--anchor", "2026-12-01T00:00:00Z")  # month by default
    assert code != 0 and "anchor" in err
