"""`crosslogic tenants|environments|keys|models|deployments …`: the admin API from a terminal.

Each command is one or a few requests through `AdminClient`; what comes back is printed as a
table (lists), ``field: value`` lines (one object) or, with ``--json``, as JSON. An error
answer prints the API's own message and exits 1; a missing token or URL exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.cli.admin_client import (
    AdminApiError,
    AdminClient,
    AdminConfigError,
    AdminUnreachable,
    resolve_target,
)
from services.cli.admin_format import (
    DEPLOYMENT_COLUMNS,
    ENVIRONMENT_COLUMNS,
    KEY_COLUMNS,
    MODEL_COLUMNS,
    NODE_COLUMNS,
    TENANT_COLUMNS,
    Column,
    format_json,
    format_object,
    format_table,
    new_key_message,
    parse_expires,
)

Command = Callable[[AdminClient, argparse.Namespace], Any]
"""Does the requests; returns what to print: an object, a list (with `columns`), or None."""


def _client(args: argparse.Namespace) -> AdminClient:
    state_dir = Path(os.environ.get("CROSSLOGIC_STATE_DIR", ".state/dev"))
    return AdminClient(resolve_target(args.admin_url, args.admin_token, os.environ, state_dir))


def _run(command: Command, columns: Sequence[Column] = ()) -> Callable[[argparse.Namespace],
                                                                        int]:
    def run(args: argparse.Namespace) -> int:
        try:
            result = command(_client(args), args)
        except AdminConfigError as exc:
            print(f"crosslogic: {exc}", file=sys.stderr)
            return 2
        except (AdminApiError, AdminUnreachable, ValueError) as exc:
            print(f"crosslogic: {exc}", file=sys.stderr)
            return 1
        if args.json:
            if result is not None:
                print(format_json(result))
        elif isinstance(result, list):
            print(format_table(result, columns) if result else "(none)")
        elif isinstance(result, dict) and "key" in result and "last_four" in result:
            print(new_key_message(result))
        elif isinstance(result, dict):
            print(format_object(result))
        return 0

    return run


def _limits(args: argparse.Namespace, *, concurrency: bool) -> dict[str, int]:
    """The limit flags given, as the API's field names (flags not given are left out)."""
    names = [("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute"),
             ("tpd", "tokens_per_day")] + ([("concurrency", "concurrency")] if concurrency
                                           else [])
    return {field: getattr(args, flag) for flag, field in names
            if getattr(args, flag, None) is not None}


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# --------------------------------------------------------------------------- tenants


def _tenants_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/tenants", {"name": a.name, **_given(a, "email")})


def _tenants_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/tenants")


def _tenants_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/tenants/{a.id}")


def _tenants_update(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.patch(f"/tenants/{a.id}", _given(a, "name", "email"))


def _tenants_suspend(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.id}/suspend", _given(a, "reason"))


def _tenants_reactivate(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.id}/reactivate", _given(a, "reason"))


# --------------------------------------------------------------------------- environments


def _environments_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.tenant_id}/environments",
                  {"name": a.name, "region": a.region,
                   "quota": _limits(a, concurrency=False)})


def _environments_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all(f"/tenants/{a.tenant_id}/environments")


def _environments_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/environments/{a.id}")


def _environments_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body = _given(a, "name", "region", "status")
    quota = _limits(a, concurrency=False)
    if quota:
        body["quota"] = quota
    return c.patch(f"/environments/{a.id}", body)


# --------------------------------------------------------------------------- keys


def _keys_create(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {**_given(a, "name", "role"),
                            "limits": _limits(a, concurrency=True)}
    if a.expires:
        body["expires_at"] = parse_expires(a.expires)
    return c.post(f"/environments/{a.environment_id}/keys", body)


def _keys_list(c: AdminClient, a: argparse.Namespace) -> Any:
    if a.tenant:
        return c.list_all(f"/tenants/{a.tenant}/keys")
    return c.list_all(f"/environments/{a.environment}/keys")


def _keys_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/keys/{a.id}")


def _keys_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body = _given(a, "name", "role")
    limits = _limits(a, concurrency=True)
    if limits:
        body["limits"] = limits
    if a.expires:
        body["expires_at"] = parse_expires(a.expires)
    return c.patch(f"/keys/{a.id}", body)


def _keys_revoke(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/keys/{a.id}/revoke", _given(a, "reason"))


def _keys_rotate(c: AdminClient, a: argparse.Namespace) -> Any:
    body = _given(a, "reason")
    if a.expires:
        body["expires_at"] = parse_expires(a.expires)
    elif a.no_expiry:
        body["expires_at"] = None
    return c.post(f"/keys/{a.id}/rotate", body)


# --------------------------------------------------------------------------- models

WEIGHTS_HELP = ("where nodes load the weights from: hf://ORG/REPO, r2://BUCKET/PREFIX, or "
                "file:///PATH (local cloud only); default: the Hub repo of the model's name")


def _models_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/models", {"name": a.name, "family": a.family, "vram_gb": a.vram_gb,
                              "input_price_per_million": a.input_price,
                              "output_price_per_million": a.output_price,
                              "context_length": a.context_length,
                              "weights_source": a.weights_source})


def _models_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/models")


def _models_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/models/{a.id}")


def _models_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body = _given(a, "family", "vram_gb", "context_length", "status", "weights_source")
    if a.input_price is not None:
        body["input_price_per_million"] = a.input_price
    if a.output_price is not None:
        body["output_price_per_million"] = a.output_price
    return c.patch(f"/models/{a.id}", body)


# --------------------------------------------------------------------------- deployments


def _deployments_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/deployments", {"model": a.model, "regions": a.region,
                                   "gpu_type": a.gpu_type, "spot": a.spot,
                                   "min_nodes": a.min, "max_nodes": a.max,
                                   "allow_on_demand_fallback": not a.no_fallback})


def _deployments_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/deployments")


def _deployments_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/deployments/{a.id}")


def _deployments_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = _given(a, "gpu_type")
    if a.region:
        body["regions"] = a.region
    if a.min is not None:
        body["min_nodes"] = a.min
    if a.max is not None:
        body["max_nodes"] = a.max
    if a.spot is not None:
        body["spot"] = a.spot
    return c.patch(f"/deployments/{a.id}", body)


def _deployments_delete(c: AdminClient, a: argparse.Namespace) -> Any:
    c.delete(f"/deployments/{a.id}")
    if not a.json:
        print(f"deleted deployment {a.id}")


# --------------------------------------------------------------------------- nodes


def _nodes_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/nodes")


def _nodes_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/nodes/{a.id}")


def _nodes_drain(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"reason": a.reason}
    if a.deadline is not None:
        body["deadline_seconds"] = a.deadline
    return c.post(f"/nodes/{a.id}/drain", body)


def _nodes_terminate(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/nodes/{a.id}/terminate", {"reason": a.reason})


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


# --------------------------------------------------------------------------- subscriptions

_SUBSCRIPTION_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("KIND", "kind"), ("TARGET", "target"), ("EVENTS", "event_types"),
    ("TENANT", "tenant_id"), ("STATUS", "status"), ("FAILING SINCE", "failing_since"))
_DELIVERY_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("EVENT", "event_type"), ("STATUS", "status"), ("ATTEMPTS", "attempts"),
    ("LAST STATUS", "last_status_code"), ("NEXT ATTEMPT", "next_attempt_at"),
    ("CREATED", "created_at"), ("ERROR", "last_error"))
_ATTEMPT_COLUMNS: tuple[Column, ...] = (
    ("STARTED", "started_at"), ("DELIVERY", "delivery_id"), ("#", "attempt"),
    ("OUTCOME", "outcome"), ("STATUS", "status_code"), ("MS", "latency_ms"),
    ("ERROR", "error"), ("ANSWER", "response_excerpt"))


def _pages(c: AdminClient, path: str, filters: dict[str, str | int],
           most: int | None = None) -> list[Any]:
    """Rows of a paged list with filters, following `next_cursor` (up to `most`)."""
    rows: list[Any] = []
    query: dict[str, str | int] = {**filters, "limit": min(most or 200, 200)}
    while True:
        page = c.get(path, query)
        rows.extend(page["data"])
        if not page.get("next_cursor") or (most is not None and len(rows) >= most):
            return rows[:most] if most is not None else rows
        query["cursor"] = page["next_cursor"]


def _subscriptions_create(c: AdminClient, a: argparse.Namespace) -> Any:
    # "-" reads the target from stdin: a webhook URL holds its token, and arguments show
    # in `ps` and shell history.
    target = sys.stdin.readline().strip() if a.target == "-" else a.target
    body: dict[str, Any] = {"kind": a.kind, "target": target, "event_types": a.event,
                            **_given(a, "description", "secret")}
    if a.tenant:
        body["tenant_id"] = a.tenant
    return c.post("/subscriptions", body)


def _subscriptions_list(c: AdminClient, a: argparse.Namespace) -> Any:
    filters: dict[str, str | int] = {}
    if a.tenant:
        filters["tenant_id"] = a.tenant
    if a.platform:
        filters["scope"] = "platform"
    return _pages(c, "/subscriptions", filters)


def _subscriptions_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/subscriptions/{a.id}")


def _subscriptions_delete(c: AdminClient, a: argparse.Namespace) -> Any:
    c.delete(f"/subscriptions/{a.id}")
    if not a.json:
        print(f"deleted subscription {a.id}")


def _subscriptions_deliveries(c: AdminClient, a: argparse.Namespace) -> Any:
    if a.attempts:
        attempts = _pages(c, f"/subscriptions/{a.id}/attempts", {}, a.limit)
        if a.json:
            return attempts
        print(format_table(attempts, _ATTEMPT_COLUMNS) if attempts else "(none)")
        return None
    filters: dict[str, str | int] = {"status": a.status} if a.status else {}
    return _pages(c, f"/subscriptions/{a.id}/deliveries", filters, a.limit)


def _subscriptions_replay(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/subscriptions/{a.id}/deliveries/{a.delivery_id}/replay")


# --------------------------------------------------------------------------- the parsers


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-url", metavar="URL",
                        help="admin API (default: $CROSSLOGIC_ADMIN_URL, the running "
                             "`crosslogic dev`, or http://127.0.0.1:8081)")
    common.add_argument("--admin-token", metavar="TOKEN",
                        help="admin token (prefer $CROSSLOGIC_ADMIN_TOKEN: arguments show "
                             "in `ps`)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    return common


def _limit_flags(p: argparse.ArgumentParser, *, concurrency: bool) -> None:
    p.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    p.add_argument("--tpm", type=int, metavar="N", help="tokens per minute")
    p.add_argument("--tpd", type=int, metavar="N", help="tokens per day")
    if concurrency:
        p.add_argument("--concurrency", type=int, metavar="N", help="requests in flight")


def register_admin_commands(sub: Any) -> None:
    """Add the admin groups to `crosslogic`'s subparsers (`sub`: argparse's
    `_SubParsersAction`, which has no public type)."""
    common = _common()

    def leaf(group: Any, name: str, help_: str, command: Command,
             columns: Sequence[Column] = ()) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, parents=[common])
        p.set_defaults(func=_run(command, columns))
        return p

    def group(name: str, help_: str) -> Any:
        return sub.add_parser(name, help=help_).add_subparsers(dest=f"{name}_command",
                                                                required=True)

    g = group("tenants", "tenants (admin API)")
    p = leaf(g, "create", "create a tenant", _tenants_create)
    p.add_argument("name")
    p.add_argument("--email")
    leaf(g, "list", "list tenants", _tenants_list, TENANT_COLUMNS)
    leaf(g, "get", "show a tenant", _tenants_get).add_argument("id")
    p = leaf(g, "update", "change a tenant's name or e-mail", _tenants_update)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--email")
    for name, command in (("suspend", _tenants_suspend), ("reactivate", _tenants_reactivate)):
        p = leaf(g, name, f"{name} a tenant", command)
        p.add_argument("id")
        p.add_argument("--reason")

    g = group("environments", "environments of a tenant (admin API)")
    p = leaf(g, "create", "create an environment", _environments_create)
    p.add_argument("tenant_id")
    p.add_argument("name")
    p.add_argument("--region", required=True)
    _limit_flags(p, concurrency=False)
    leaf(g, "list", "list a tenant's environments", _environments_list,
         ENVIRONMENT_COLUMNS).add_argument("tenant_id")
    leaf(g, "get", "show an environment", _environments_get).add_argument("id")
    p = leaf(g, "update", "change an environment", _environments_update)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--region")
    p.add_argument("--status", choices=("active", "suspended"))
    _limit_flags(p, concurrency=False)

    g = group("keys", "API keys (admin API)")
    p = leaf(g, "create", "create an API key (printed once)", _keys_create)
    p.add_argument("environment_id")
    p.add_argument("--name")
    p.add_argument("--role", choices=("admin", "developer", "readonly"))
    p.add_argument("--expires", metavar="WHEN", help="30d, 12h, 90m from now, or an ISO time")
    _limit_flags(p, concurrency=True)
    p = leaf(g, "list", "list a tenant's or an environment's keys (masked)", _keys_list,
             KEY_COLUMNS)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tenant", metavar="ID")
    which.add_argument("--environment", metavar="ID")
    leaf(g, "get", "show a key (masked)", _keys_get).add_argument("id")
    p = leaf(g, "update", "change a key's name, role, limits or expiry", _keys_update)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--role", choices=("admin", "developer", "readonly"))
    p.add_argument("--expires", metavar="WHEN")
    _limit_flags(p, concurrency=True)
    for name, command, text in (
            ("revoke", _keys_revoke, "revoke a key"),
            ("rotate", _keys_rotate, "revoke a key and print its successor (once)")):
        p = leaf(g, name, text, command)
        p.add_argument("id")
        p.add_argument("--reason")
        if name == "rotate":
            expiry = p.add_mutually_exclusive_group()
            expiry.add_argument("--expires", metavar="WHEN",
                                help="the successor's expiry (default: the old key's)")
            expiry.add_argument("--no-expiry", action="store_true",
                                help="the successor never expires")

    g = group("models", "models of the catalog (admin API)")
    p = leaf(g, "create", "add a model", _models_create)
    p.add_argument("name")
    p.add_argument("--family", required=True)
    p.add_argument("--vram-gb", type=int, required=True)
    p.add_argument("--input-price", required=True, metavar="USD",
                   help="per million input tokens, e.g. 0.15")
    p.add_argument("--output-price", required=True, metavar="USD")
    p.add_argument("--context-length", type=int, required=True)
    p.add_argument("--weights-source", metavar="URI", help=WEIGHTS_HELP)
    leaf(g, "list", "list models", _models_list, MODEL_COLUMNS)
    leaf(g, "get", "show a model", _models_get).add_argument("id")
    p = leaf(g, "update", "change a model", _models_update)
    p.add_argument("id")
    p.add_argument("--family")
    p.add_argument("--vram-gb", type=int)
    p.add_argument("--input-price", metavar="USD")
    p.add_argument("--output-price", metavar="USD")
    p.add_argument("--context-length", type=int)
    p.add_argument("--status", choices=("active", "suspended", "deleted"))
    p.add_argument("--weights-source", metavar="URI", help=WEIGHTS_HELP)

    g = group("deployments", "model deployments (admin API)")
    p = leaf(g, "create", "deploy a model", _deployments_create)
    p.add_argument("--model", required=True, help="model name or id")
    p.add_argument("--region", action="append", required=True, help="repeatable")
    p.add_argument("--gpu-type", required=True)
    p.add_argument("--spot", action="store_true", help="use spot instances")
    p.add_argument("--min", type=int, required=True, metavar="N", help="fewest nodes")
    p.add_argument("--max", type=int, required=True, metavar="N", help="most nodes")
    p.add_argument("--no-fallback", action="store_true",
                   help="never fall back to on-demand when spot is short")
    leaf(g, "list", "list deployments", _deployments_list, DEPLOYMENT_COLUMNS)
    leaf(g, "get", "show a deployment", _deployments_get).add_argument("id")
    p = leaf(g, "update", "change a deployment", _deployments_update)
    p.add_argument("id")
    p.add_argument("--region", action="append", help="the new regions (repeatable)")
    p.add_argument("--gpu-type")
    p.add_argument("--spot", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--min", type=int, metavar="N")
    p.add_argument("--max", type=int, metavar="N")
    leaf(g, "delete", "delete a deployment", _deployments_delete).add_argument("id")

    g = group("nodes", "GPU nodes (admin API)")
    leaf(g, "list", "list nodes with their latest heartbeat", _nodes_list, NODE_COLUMNS)
    leaf(g, "get", "show a node", _nodes_get).add_argument("id")
    p = leaf(g, "drain", "ask a node's agent to drain and leave", _nodes_drain)
    p.add_argument("id")
    p.add_argument("--reason", default="drained by an operator")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="how long in-flight requests may take")
    p = leaf(g, "terminate", "have the orchestrator drain a node and take its machine down",
             _nodes_terminate)
    p.add_argument("id")
    p.add_argument("--reason", default="terminated by an operator")

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

    g = group("subscriptions", "notification subscriptions and their deliveries (admin API)")
    p = leaf(g, "create", "send events to Discord, Slack, e-mail or a signed webhook",
             _subscriptions_create)
    p.add_argument("kind", choices=("discord", "slack", "email", "generic"))
    p.add_argument("target", help="webhook URL or e-mail address; '-' reads it from stdin")
    p.add_argument("--event", action="append", required=True, metavar="PATTERN",
                   help="event type pattern, e.g. 'node.*' (repeatable)")
    p.add_argument("--tenant", metavar="ID", help="a tenant's subscription (its events only); "
                   "default: a platform one")
    p.add_argument("--secret", help="generic: a whsec_ signing secret (default: a new one, "
                   "printed once)")
    p.add_argument("--description")
    p = leaf(g, "list", "list subscriptions", _subscriptions_list, _SUBSCRIPTION_COLUMNS)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tenant", metavar="ID", help="only this tenant's")
    which.add_argument("--platform", action="store_true", help="only platform ones")
    leaf(g, "get", "show a subscription (target masked)", _subscriptions_get).add_argument("id")
    leaf(g, "delete", "delete a subscription", _subscriptions_delete).add_argument("id")
    p = leaf(g, "deliveries", "a subscription's deliveries (or, with --attempts, every "
             "request made), newest first", _subscriptions_deliveries, _DELIVERY_COLUMNS)
    p.add_argument("id")
    p.add_argument("--status", choices=("pending", "delivered", "failed", "cancelled"))
    p.add_argument("--attempts", action="store_true",
                   help="the delivery log: status, latency, the start of each answer")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows")
    p = leaf(g, "replay", "deliver a failed delivery again", _subscriptions_replay)
    p.add_argument("id", help="the subscription")
    p.add_argument("delivery_id")
