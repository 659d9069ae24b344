"""Every response of every service carries the reference's security headers: each service runs
for real (its own app, its own NATS identity) and answers its health, readiness and metrics
routes, its own routes refusing bad input, a route it does not have and a method it does not
allow. The gateway's edge sets them itself (tests/integration/test_gateway_middleware.py
covers its streams); here it stands beside the others."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.admin.app import create_admin_app
from services.admin.settings import AdminSettings
from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.infra.devstack import free_port
from services.infra.http import SECURITY_HEADERS
from services.infra.natsauth.identities import Role
from services.infra.relay import RelaySettings, relay_app
from services.infra.settings import Secret
from services.notifier.app import create_notifier_app
from services.notifier.settings import NotifierSettings
from tests.doubles.stripe_server import running_stripe
from tests.integration.fleet_fixtures import Fleet, fleet  # noqa: F401
from tests.integration.test_monitor_basics import serve

ADMIN_TOKEN = "security-headers-test-token-8d2f6a1c4b9e"

# (method, path, body) every service is asked, whatever else it serves.
SHELL_CALLS: list[tuple[str, str, bytes | None]] = [
    ("GET", "/health", None), ("GET", "/ready", None), ("GET", "/metrics", None),
    ("GET", "/no-such-route", None), ("DELETE", "/health", None)]

OWN_CALLS: dict[str, list[tuple[str, str, bytes | None]]] = {
    "gateway": [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", b"{")],
    "admin": [("GET", "/admin/v1/tenants", None), ("POST", "/admin/v1/tenants", b"[")],
    "billing": [("POST", "/webhooks/stripe", b'{"id": "evt_forged"}')],
    "notifier": [("POST", "/alertmanager", b"not json")],
    "monitor": [], "orchestrator": [], "relay": [],
}


def runner_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture
async def everything(fleet: Fleet) -> AsyncIterator[dict[str, str]]:  # noqa: F811
    """Each service's base URL, all running; and a metrics port (METRICS_PORT) of one."""
    f = fleet
    await f.start_cloud()
    await f.start_control_plane()
    urls = {name: runner_url(runner) for name, runner in f.runners
            if name in ("monitor", "gateway", "orchestrator")}
    started: list[web.AppRunner] = []
    metrics_port = free_port()
    async with running_stripe() as stripe:
        apps: dict[str, web.Application] = {
            "admin": create_admin_app(AdminSettings(
                **f.core(Role.ADMIN_API), admin_token=Secret(ADMIN_TOKEN),
                db_min_connections=1)),
            "billing": create_billing_app(BillingSettings(
                **f.core(Role.BILLING), stripe_secret_key=Secret(stripe.api_key),
                stripe_api_base=stripe.url, stripe_webhook_secret=Secret("whsec_test"),
                billing_leader_retry=0.2)),
            "notifier": create_notifier_app(NotifierSettings(
                **f.core(Role.NOTIFIER), db_min_connections=1)),
            "relay": relay_app(RelaySettings(**f.core(Role.RELAY), relay_leader_retry=0.2,
                                             metrics_port=metrics_port)),
        }
        try:
            for name, app in apps.items():
                urls[name], runner = await serve(app)
                started.append(runner)
            urls["relay metrics port"] = f"http://127.0.0.1:{metrics_port}"
            yield urls
        finally:
            for runner in reversed(started):
                await runner.cleanup()


async def test_every_response_of_every_service_carries_the_security_headers(
        everything: dict[str, str]) -> None:
    wanted = {str(name): value for name, value in SECURITY_HEADERS}
    calls: dict[str, list[tuple[str, str, bytes | None]]] = {
        name: [*SHELL_CALLS, *OWN_CALLS[name]] for name in OWN_CALLS}
    calls["relay metrics port"] = [("GET", "/metrics", None), ("GET", "/nope", None)]
    assert set(calls) == set(everything)
    statuses: set[int] = set()
    missing: list[str] = []
    async with aiohttp.ClientSession() as session:
        for service, service_calls in calls.items():
            for method, path, body in service_calls:
                headers: dict[str, Any] = {"Content-Type": "application/json"} if body else {}
                async with session.request(method, everything[service] + path, data=body,
                                           headers=headers) as r:
                    await r.read()
                    statuses.add(r.status)
                    got = {name: r.headers.get(name) for name in wanted}
                    if got != wanted:
                        wrong = sorted(n for n in wanted if got[n] != wanted[n])
                        missing.append(f"{service} {method} {path} -> {r.status}: {wrong}")
                    # Set once: a handler's own value is replaced, never doubled.
                    assert all(len(r.headers.getall(n, [])) <= 1 for n in wanted), (service, path)
    assert not missing, missing
    # Successes and refusals of several kinds were all looked at.
    assert {200, 404, 405} <= statuses and statuses & {400, 401, 403}
