"""`crosslogic subscriptions …`: notification subscriptions, their deliveries and
replays."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from services.cli.admin_client import AdminClient
from services.cli.admin_format import Column, format_table
from services.cli.admin_runner import AdminParsers, given, pages

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


def _subscriptions_create(c: AdminClient, a: argparse.Namespace) -> Any:
    # "-" reads the target from stdin: a webhook URL holds its token, and arguments show
    # in `ps` and shell history.
    target = sys.stdin.readline().strip() if a.target == "-" else a.target
    body: dict[str, Any] = {"kind": a.kind, "target": target, "event_types": a.event,
                            **given(a, "description", "secret")}
    if a.tenant:
        body["tenant_id"] = a.tenant
    return c.post("/subscriptions", body)


def _subscriptions_list(c: AdminClient, a: argparse.Namespace) -> Any:
    filters: dict[str, str | int] = {}
    if a.tenant:
        filters["tenant_id"] = a.tenant
    if a.platform:
        filters["scope"] = "platform"
    return pages(c, "/subscriptions", filters)


def _subscriptions_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/subscriptions/{a.id}")


def _subscriptions_delete(c: AdminClient, a: argparse.Namespace) -> Any:
    c.delete(f"/subscriptions/{a.id}")
    if not a.json:
        print(f"deleted subscription {a.id}")


def _subscriptions_deliveries(c: AdminClient, a: argparse.Namespace) -> Any:
    if a.attempts:
        attempts = pages(c, f"/subscriptions/{a.id}/attempts", {}, a.limit)
        if a.json:
            return attempts
        print(format_table(attempts, _ATTEMPT_COLUMNS) if attempts else "(none)")
        return None
    filters: dict[str, str | int] = {"status": a.status} if a.status else {}
    return pages(c, f"/subscriptions/{a.id}/deliveries", filters, a.limit)


def _subscriptions_replay(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/subscriptions/{a.id}/deliveries/{a.delivery_id}/replay")


def register_subscription_commands(parsers: AdminParsers) -> None:
    """Add `subscriptions`."""
    leaf, group = parsers.leaf, parsers.group
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
