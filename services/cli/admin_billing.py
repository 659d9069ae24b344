"""`crosslogic budgets|billing …`: spend budgets and a tenant's Stripe billing."""

from __future__ import annotations

import argparse
from decimal import Decimal
from typing import Any

from services.cli.admin_client import AdminClient
from services.cli.admin_format import Column, format_object, format_table
from services.cli.admin_runner import AdminParsers

# --------------------------------------------------------------------------- budgets

_BUDGET_PATHS = {"tenant": "tenants", "environment": "environments", "key": "keys"}
_BUDGET_COLUMNS: tuple[Column, ...] = (
    ("SCOPE", "scope"), ("ID", "scope_id"), ("AMOUNT", "amount"), ("PERIOD", "period"),
    ("RESETS", "period_end"))


def _budgets_set(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"amount": a.amount, "period": a.period}
    # Sent as given: the API says which a period needs (days) or refuses (day, month).
    if a.every_days is not None:
        body["every_days"] = a.every_days
    if a.anchor is not None:
        body["anchor"] = a.anchor
    return c.put(f"/{_BUDGET_PATHS[a.scope]}/{a.id}/budget", body)


def _budgets_show(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/{_BUDGET_PATHS[a.scope]}/{a.id}/budget")


def _budgets_clear(c: AdminClient, a: argparse.Namespace) -> Any:
    c.delete(f"/{_BUDGET_PATHS[a.scope]}/{a.id}/budget")
    return {"cleared": f"{a.scope} {a.id}"}


def _budgets_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/tenants/{a.tenant_id}/budgets")["data"]


# --------------------------------------------------------------------------- billing

_EXPORT_COLUMNS: tuple[Column, ...] = (
    ("HOUR", "hour"), ("METER", "meter"), ("SEQ", "sequence"), ("VALUE", "value"),
    ("STATUS", "status"), ("DUPLICATE", "duplicate"), ("ERROR", "error"))
_HELD_COLUMNS: tuple[Column, ...] = (
    ("TENANT", "tenant_id"), ("IDENTIFIER", "identifier"), ("VALUE", "value"),
    ("CUSTOMER", "customer_id"), ("PLANNED", "planned_at"), ("STATUS", "status"),
    ("ERROR", "error"))


def _billing_link(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.tenant_id}/billing/customer", {})


_SETUP_COLUMNS: tuple[Column, ...] = (
    ("TENANT", "tenant_id"), ("OUTCOME", "outcome"), ("COST FROM", "cost_from"),
    ("ITEM", "subscription_item_id"))


def _billing_setup(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"switch": not a.no_switch}
    if a.tenant:
        body["tenant_id"] = a.tenant
    if a.at:
        body["switch_at"] = a.at
    answer = c.post("/billing/setup", body)
    if a.json:
        return answer
    made = ", ".join(answer["created"]) or "nothing (all was there)"
    print(format_object({
        "meter": f"{answer['meter_id']} (event name {answer['event_name']})",
        "price": f"{answer['price_id']}: {answer['unit_amount_decimal']} "
                 f"{answer['currency']} minor units per {answer['unit']} {answer['currency']}",
        "created": made}))
    if answer["tenants"]:
        print()
    return answer["tenants"]


def _billing_show(c: AdminClient, a: argparse.Namespace) -> Any:
    answer = c.get(f"/tenants/{a.tenant_id}/billing")
    if a.json:
        return answer
    account = answer.get("account") or {}
    totals = answer["totals"]
    print(format_object({
        "tenant": answer["tenant_id"], "customer": account.get("customer_id"),
        "subscription": account.get("subscription_id"),
        "subscription status": account.get("subscription_status"),
        "payment": account.get("payment_status"),
        "flagged at": account.get("payment_flagged_at"),
        "tokens exported": totals["exported"], "tokens planned": totals["planned"],
        "tokens failed": totals["failed"], "tokens skipped": totals["skipped"],
        "tokens held": totals["held"], "billed by cost from": account.get("cost_from"),
        **{f"cost {status}": _money(answer["cost_totals"][status], answer["cost_unit"])
           for status in ("exported", "planned", "failed", "skipped", "held")
           if answer["cost_totals"][status]}}))
    if answer["exports"]:
        print()
        print(format_table(answer["exports"], _EXPORT_COLUMNS))
    if totals["held"]:
        print(f"\n{totals['held']} tokens are held: `crosslogic billing exports` lists them, "
              "`crosslogic billing settle` settles one after checking Stripe.")
    return None


def _money(units: int, unit: str) -> str:
    return f"{Decimal(units) * Decimal(unit):f} ({units} units)"


def _billing_exports(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get("/billing/exports", {"status": a.status, "limit": str(a.limit)})["data"]


def _billing_settle(c: AdminClient, a: argparse.Namespace) -> Any:
    answer = c.post(f"/tenants/{a.tenant_id}/billing/exports/settle",
                    {"identifier": a.identifier,
                     "action": "resend" if a.resend else "mark_exported"})
    if a.json:
        return answer
    export = answer["export"]
    how = {"sent": "resent: Stripe took it", "duplicate": "resent: Stripe already had it",
           None: "marked exported (not sent)"}[answer["stripe"]]
    return {"identifier": export["identifier"], "settled": how, "status": export["status"],
            "tokens": export["value"], "meter": export["meter"], "hour": export["hour"]}


def register_billing_commands(parsers: AdminParsers) -> None:
    """Add `budgets` and `billing`."""
    leaf, group = parsers.leaf, parsers.group
    g = group("budgets", "spend budgets in money of a tenant, environment or key (admin API)")
    p = leaf(g, "set", "at most AMOUNT dollars per day, month or N days; replaces one set "
             "before", _budgets_set)
    p.add_argument("scope", choices=_BUDGET_PATHS)
    p.add_argument("id")
    p.add_argument("amount", help="US dollars, e.g. 250 or 0.5")
    p.add_argument("--period", choices=("day", "month", "days"), default="month",
                   help="day: resets 00:00 UTC; month: the 1st, 00:00 UTC; days: every "
                        "--every-days days from --anchor")
    p.add_argument("--every-days", type=int, metavar="N",
                   help="with --period days: the period's length, 1 to 366 days")
    p.add_argument("--anchor", metavar="TIME",
                   help="with --period days: when a period starts, RFC 3339 with its offset "
                        "(2026-12-01T00:00:00Z)")
    p = leaf(g, "show", "a budget and its current period", _budgets_show)
    p.add_argument("scope", choices=_BUDGET_PATHS)
    p.add_argument("id")
    p = leaf(g, "clear", "remove a budget", _budgets_clear)
    p.add_argument("scope", choices=_BUDGET_PATHS)
    p.add_argument("id")
    leaf(g, "list", "every budget of a tenant, its environments and keys", _budgets_list,
         _BUDGET_COLUMNS).add_argument("tenant_id")

    g = group("billing", "a tenant's Stripe billing (admin API)")
    leaf(g, "link", "give a tenant a Stripe customer and metered subscription (once)",
         _billing_link).add_argument("tenant_id")
    leaf(g, "show", "a tenant's Stripe link, payment standing and meter exports",
         _billing_show).add_argument("tenant_id")
    p = leaf(g, "setup", "make or check the cost meter and price in Stripe, and move the "
             "linked tenants onto it", _billing_setup, _SETUP_COLUMNS)
    p.add_argument("--no-switch", action="store_true",
                   help="only make or check the meter and price; move no tenant")
    p.add_argument("--tenant", metavar="ID", help="move only this tenant")
    p.add_argument("--at", metavar="TIME", help="first hour billed by cost, a whole UTC hour "
                   "(ISO-8601, e.g. the start of the next billing period); default: the "
                   "next hour")
    p = leaf(g, "exports", "every tenant's meter exports that are held (or failed, or "
             "planned)", _billing_exports, _HELD_COLUMNS)
    p.add_argument("--status", choices=("held", "failed", "planned"), default="held")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N rows")
    p = leaf(g, "settle", "settle a held meter export after looking its identifier up in "
             "Stripe", _billing_settle)
    p.add_argument("tenant_id")
    p.add_argument("identifier", help="the export's identifier (`billing exports`)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--resend", action="store_true",
                     help="Stripe does not have it: send it now")
    how.add_argument("--exported", action="store_true",
                     help="Stripe has it: record it as exported, send nothing")
