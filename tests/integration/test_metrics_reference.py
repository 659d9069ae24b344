"""Every metric the reference document lists exists, with its labels, on the service that owns
it: the gateway, the monitor and billing run for real, serve traffic, and their /metrics are
scraped. Where the labels differ from the reference's, the reason is in docs/operations.md
(no key_id label: keys are unbounded)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings
from tests.doubles.stripe_server import running_stripe
from tests.helpers import eventually
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401
from tests.integration.test_monitor_basics import serve

HELLO = [{"role": "user", "content": "Hello there"}]

# Every service is built on the same shell: these are on all of them.
SHELL = {"http_requests_total": {"method", "path", "status"},
         "http_request_duration_seconds": {"method", "path"}}

REFERENCE: dict[str, dict[str, set[str]]] = {
    "gateway": {
        **SHELL,
        "http_request_size_bytes": {"method", "path"},
        "http_response_size_bytes": {"method", "path"},
        "rate_limit_exceeded_total": {"reason"},
        "rate_limit_remaining": {"kind"},
        "auth_attempts_total": {"status"},
        "auth_failures_total": {"reason"},
        "loadbalancer_requests_total": {"model", "node"},
        "loadbalancer_latency_seconds": {"model", "node"},
        "loadbalancer_errors_total": {"model", "node", "reason"},
        "tokens_processed_total": {"model", "tenant_id"},
    },
    "monitor": {
        **SHELL,
        "node_health_score": {"node_id"},
        "node_heartbeat_age_seconds": {"node_id"},
        "nodes_active_total": set(),
        "nodes_draining_total": set(),
    },
    "billing": {
        **SHELL,
        "tokens_processed_total": {"model", "tenant_id"},
        "usage_records_created_total": set(),
        "billing_exports_total": {"status"},
    },
}


async def scrape(url: str) -> dict[str, set[frozenset[str]]]:
    """{metric name: the label-name sets its samples carry}, histograms and counters under the
    name the reference uses (`_total` kept, `_bucket`/`_sum`/`_count` folded)."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    found: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "histogram":
                name = family.name
            elif family.type == "counter" and not name.endswith("_total"):
                continue  # the _created twin
            found.setdefault(name, set()).add(frozenset(sample.labels) - {"le"})
    return found


def missing(found: dict[str, set[frozenset[str]]], wanted: dict[str, set[str]]) -> list[str]:
    return [f"{name}{sorted(labels)}" for name, labels in wanted.items()
            if frozenset(labels) not in found.get(name, set())]


@pytest.fixture
async def services(platform: Platform) -> AsyncIterator[dict[str, Any]]:  # noqa: F811
    p = platform
    def core(role: Role) -> dict[str, Any]:
        return dict(database_url=Secret(p.servers.database_url),
                    redis_url=Secret(p.servers.redis_url), nats_url=Secret(p.servers.nats_url),
                    nats_creds=Secret(p.servers.creds(role)), log_json=False,
                    event_poll_interval=0.2)
    runners: list[web.AppRunner] = []
    async with running_stripe() as stripe:
        monitor_url, runner = await serve(create_monitor_app(MonitorSettings(
            **core(Role.MONITOR), gauges_every_seconds=0.2, sweep_every_seconds=0.2,
            leader_retry_seconds=0.2)))
        runners.append(runner)
        billing_url, runner = await serve(create_billing_app(BillingSettings(
            **core(Role.BILLING), stripe_secret_key=Secret(stripe.api_key),
            stripe_api_base=stripe.url,
            billing_push_interval=0.2, billing_leader_retry=0.2)))
        runners.append(runner)
        try:
            yield {"monitor": monitor_url, "billing": billing_url}
        finally:
            for r in runners:
                await r.cleanup()


async def test_every_reference_metric_is_on_the_service_that_owns_it(
        platform: Platform, services: dict[str, str]) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    node = await p.add_node()
    await p.routable(1)
    client = p.client()
    for stream in (False, True):
        r = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                                 stream=stream)
        if stream:
            async for _ in r:  # type: ignore[union-attr]
                pass
    await node.faults(error_rate=1.0)
    with pytest.raises(openai.APIStatusError):  # a node error: loadbalancer_errors_total
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    await node.faults(error_rate=0.0)
    with pytest.raises(openai.AuthenticationError):  # auth_failures_total
        await p.client("clsk_live_" + uuid.uuid4().hex).models.list()
    await client.close()
    urls = {"gateway": p.gateway_url, **services}

    async def all_there() -> list[str]:
        gaps = []
        for service, wanted in REFERENCE.items():
            gaps += [f"{service}: {m}" for m in missing(await scrape(urls[service]), wanted)]
        return gaps

    async def complete() -> bool:
        return not await all_there()

    try:
        await eventually(complete, timeout=20, what="every reference metric")
    except AssertionError:
        raise AssertionError(f"missing: {await all_there()}") from None
