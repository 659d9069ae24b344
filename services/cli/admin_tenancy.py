"""`crosslogic tenants|environments|keys …`: who may call the platform, and how much."""

from __future__ import annotations

import argparse
from typing import Any

from services.cli.admin_client import AdminClient
from services.cli.admin_format import (
    ENVIRONMENT_COLUMNS,
    KEY_COLUMNS,
    TENANT_COLUMNS,
    parse_expires,
)
from services.cli.admin_runner import AdminParsers, given, limit_fields, limit_flags

# --------------------------------------------------------------------------- tenants


def _tenants_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/tenants", {"name": a.name, **given(a, "email")})


def _tenants_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all("/tenants")


def _tenants_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/tenants/{a.id}")


def _tenants_update(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.patch(f"/tenants/{a.id}", given(a, "name", "email"))


def _tenants_suspend(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.id}/suspend", given(a, "reason"))


def _tenants_reactivate(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.id}/reactivate", given(a, "reason"))


# --------------------------------------------------------------------------- environments


def _environments_create(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/tenants/{a.tenant_id}/environments",
                  {"name": a.name, "region": a.region,
                   "quota": limit_fields(a, concurrency=False)})


def _environments_list(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.list_all(f"/tenants/{a.tenant_id}/environments")


def _environments_get(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get(f"/environments/{a.id}")


def _environments_update(c: AdminClient, a: argparse.Namespace) -> Any:
    body = given(a, "name", "region", "status")
    quota = limit_fields(a, concurrency=False)
    if quota:
        body["quota"] = quota
    return c.patch(f"/environments/{a.id}", body)


# --------------------------------------------------------------------------- keys


def _keys_create(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {**given(a, "name", "role"),
                            "limits": limit_fields(a, concurrency=True)}
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
    body = given(a, "name", "role")
    limits = limit_fields(a, concurrency=True)
    if limits:
        body["limits"] = limits
    if a.expires:
        body["expires_at"] = parse_expires(a.expires)
    return c.patch(f"/keys/{a.id}", body)


def _keys_revoke(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post(f"/keys/{a.id}/revoke", given(a, "reason"))


def _keys_rotate(c: AdminClient, a: argparse.Namespace) -> Any:
    body = given(a, "reason")
    if a.expires:
        body["expires_at"] = parse_expires(a.expires)
    elif a.no_expiry:
        body["expires_at"] = None
    return c.post(f"/keys/{a.id}/rotate", body)


def register_tenancy_commands(parsers: AdminParsers) -> None:
    """Add `tenants`, `environments` and `keys`."""
    leaf, group = parsers.leaf, parsers.group
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
    limit_flags(p, concurrency=False)
    leaf(g, "list", "list a tenant's environments", _environments_list,
         ENVIRONMENT_COLUMNS).add_argument("tenant_id")
    leaf(g, "get", "show an environment", _environments_get).add_argument("id")
    p = leaf(g, "update", "change an environment", _environments_update)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--region")
    p.add_argument("--status", choices=("active", "suspended"))
    limit_flags(p, concurrency=False)

    g = group("keys", "API keys (admin API)")
    p = leaf(g, "create", "create an API key (printed once)", _keys_create)
    p.add_argument("environment_id")
    p.add_argument("--name")
    p.add_argument("--role", choices=("admin", "developer", "readonly"))
    p.add_argument("--expires", metavar="WHEN", help="30d, 12h, 90m from now, or an ISO time")
    limit_flags(p, concurrency=True)
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
    limit_flags(p, concurrency=True)
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
