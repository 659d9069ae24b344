"""A local cloud metadata service: AWS IMDSv2, GCP and Azure's routes, as the clouds serve them.

The agent's spot detection runs against this over real HTTP: in the tests on its own, and in
the local cloud, where each cluster has its own instance under `/clusters/{name}/metadata`.
Each provider's rules that the agent must follow are enforced: AWS wants a session token from
PUT /latest/api/token (401 without it), GCP wants `Metadata-Flavor: Google` (403 without it)
and long-polls with `wait_for_change` and `last_etag` as GCE's server does (an ETag other than
the value's current one is answered at once; the same one, or none, waits for the next change or
`timeout_sec`), Azure wants `Metadata: true` (400 without it).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from services.infra.aio import wait_event


class MetadataState:
    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.aws_action: dict[str, str] | None = None
        self.gcp_preempted = False
        self.azure_events: list[dict[str, Any]] = []
        self.azure_incarnation = 1
        self.gcp_changed = asyncio.Event()
        """Set, and replaced by a fresh one, at each change: every long poll waiting on the
        old one wakes, and none misses a change by another poll clearing it."""
        self.requests: list[str] = []

    def aws_notice(self, action: str, when: datetime) -> None:
        self.aws_action = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def gcp_preempt(self) -> None:
        if self.gcp_preempted:
            return
        self.gcp_preempted = True
        changed, self.gcp_changed = self.gcp_changed, asyncio.Event()
        changed.set()

    def gcp_value(self) -> tuple[str, str]:
        """`instance/preempted`'s body and its ETag (which changes only with the body)."""
        body = "TRUE" if self.gcp_preempted else "FALSE"
        return body, hashlib.sha256(f"preempted={body}".encode()).hexdigest()[:16]

    def azure_preempt(self, not_before: datetime) -> None:
        self.azure_incarnation += 1
        self.azure_events.append({
            "EventId": "602d9444-d2cd-49c7-8624-8643e7171297",
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": ["node-0"],
            "EventStatus": "Scheduled",
            "NotBefore": format_datetime(not_before, usegmt=True),
            "Description": "Virtual machine is being preempted.",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        })


    def preempt(self, provider: str, deadline: datetime) -> None:
        """The notice each provider gives before it reclaims a spot instance."""
        provider = provider.strip().lower()
        if provider == "gcp":
            self.gcp_preempt()
        elif provider == "azure":
            self.azure_preempt(deadline)
        else:
            self.aws_notice("terminate", deadline)


STATE = web.AppKey("metadata_state", MetadataState)

Resolve = Callable[[web.Request], MetadataState]
"""Which instance's metadata a request reads (raise HTTPNotFound for none)."""


def _own_state(request: web.Request) -> MetadataState:
    return request.app[STATE]


def add_metadata_routes(router: web.UrlDispatcher, prefix: str, state_of: Resolve) -> None:
    """The metadata routes under `prefix`, each reading the state `state_of` picks."""

    async def aws_token(request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400)
        token = secrets.token_urlsafe(32)
        state_of(request).tokens.add(token)
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    async def aws_instance_action(request: web.Request) -> web.Response:
        state = state_of(request)
        state.requests.append("aws")
        if request.headers.get("X-aws-ec2-metadata-token") not in state.tokens:
            return web.Response(status=401)
        if state.aws_action is None:
            return web.Response(status=404, text="Not Found")
        return web.json_response(state.aws_action)

    async def gcp_preempted(request: web.Request) -> web.Response:
        state = state_of(request)
        state.requests.append("gcp")
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        if request.query.get("wait_for_change") == "true":
            changed = state.gcp_changed
            _, etag = state.gcp_value()
            if request.query.get("last_etag", etag) == etag:
                # The caller has seen this value (or named none): wait for the next change,
                # even when the value is already TRUE; at the timeout, answer it unchanged.
                await wait_event(changed, float(request.query.get("timeout_sec", "60")))
        body, etag = state.gcp_value()
        return web.Response(text=body, headers={"Metadata-Flavor": "Google", "ETag": etag})

    async def azure_scheduled_events(request: web.Request) -> web.Response:
        state = state_of(request)
        state.requests.append("azure")
        if request.headers.get("Metadata") != "true":
            return web.json_response(
                {"error": "Bad request. Required metadata header not specified"}, status=400)
        if request.query.get("api-version") != "2020-07-01":
            return web.json_response({"error": "Bad request. api-version is invalid"},
                                     status=400)
        return web.json_response({"DocumentIncarnation": state.azure_incarnation,
                                  "Events": state.azure_events})

    router.add_put(f"{prefix}/latest/api/token", aws_token)
    router.add_get(f"{prefix}/latest/meta-data/spot/instance-action", aws_instance_action)
    router.add_get(f"{prefix}/computeMetadata/v1/instance/preempted", gcp_preempted)
    router.add_get(f"{prefix}/metadata/scheduledevents", azure_scheduled_events)


def create_metadata_app() -> web.Application:
    """One instance's metadata service."""
    app = web.Application()
    app[STATE] = MetadataState()
    add_metadata_routes(app.router, "", _own_state)
    return app
