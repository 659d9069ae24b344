"""GPU nodes: the `nodes` projection with each node's latest heartbeat from Redis, the drain
command (sent to the node's agent, which answers) and termination (recorded; the orchestrator
drains the node, takes its machine down and closes it)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

import asyncpg
import msgspec
import nats.errors
import structlog
from aiohttp import web
from msgspec import Meta

from schemas.commands import CommandKind, CommandReply, NodeCommand
from schemas.events import NodeStatus
from schemas.subjects import node_command_subject
from services.admin.routing import PAGE_QUERY, QueryParam, Route, add
from services.admin.web_io import db, json_response, page_query, path_id, read_body
from services.domain.catalog import NotFound
from services.domain.catalog.bodies import (
    Body,
    Reason,
)
from services.domain.fleet import Fleet, UnknownNode
from services.domain.node_hot_data import latest_heartbeats
from services.infra.errors import ApiError
from services.infra.http import BUS, EVENTLOG, REDIS
from services.infra.page import Page
from services.infra.request_checks import Choice, FieldError, Text, next_cursor

log = structlog.get_logger("admin.nodes")


class Heartbeat(msgspec.Struct, kw_only=True, frozen=True):
    age_seconds: float
    health_score: int
    vllm_healthy: bool
    draining: bool
    num_requests_running: float | None
    num_requests_waiting: float | None
    kv_cache_usage: float | None
    tokens_per_second: float | None


class NodeRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    cluster_name: str
    provider: str
    region: str
    instance_type: str
    gpu_type: str
    vram_total_gb: int
    model_name: str
    endpoint_url: str
    spot_instance: bool
    status: str
    status_reason: str
    deployment_id: uuid.UUID | None
    """The deployment the orchestrator launched it for (none: started by hand)."""
    terminate_requested_at: datetime | None
    registered_at: datetime
    updated_at: datetime
    heartbeat: Heartbeat | None
    """The latest heartbeat (none after 5 minutes of silence)."""


class NodeList(Page[NodeRecord], kw_only=True, frozen=True):
    pass


class DrainRequest(Body, frozen=True, kw_only=True):
    reason: Reason = "drained by an operator"
    deadline_seconds: Annotated[float, Meta(gt=0, le=86_400)] | None = None
    """How long in-flight requests may run before the agent leaves anyway."""


class DrainResult(msgspec.Struct, kw_only=True, frozen=True):
    accepted: bool
    detail: str


class TerminateRequest(Body, frozen=True, kw_only=True):
    reason: Reason = "terminated by an operator"


class TerminateResult(msgspec.Struct, kw_only=True, frozen=True):
    node_id: uuid.UUID
    status: str
    """The node's status when the request was recorded; the orchestrator does the rest."""


_STATUSES = tuple(s.value for s in NodeStatus)
_COLUMNS = ("id, cluster_name, provider, region, instance_type, gpu_type, vram_total_gb, "
            "model_name, endpoint_url, spot_instance, status, status_reason, deployment_id, "
            "terminate_requested_at, registered_at, updated_at")


async def _with_heartbeats(request: web.Request,
                           rows: Sequence[asyncpg.Record]) -> list[NodeRecord]:
    beats = await latest_heartbeats(request.app[REDIS], [r["id"] for r in rows])
    now = time.time()
    out = []
    for row, (hb, heard_at) in zip(rows, beats, strict=True):
        beat = None
        if hb is not None:
            # A heartbeat stored without a receipt time (a monitor older than the set):
            # the agent's own time is all there is.
            received = heard_at if heard_at is not None else hb.occurred_at.timestamp()
            beat = Heartbeat(age_seconds=round(max(0.0, now - received), 3),
                             health_score=hb.health_score, vllm_healthy=hb.vllm_healthy,
                             draining=hb.draining, num_requests_running=hb.num_requests_running,
                             num_requests_waiting=hb.num_requests_waiting,
                             kv_cache_usage=hb.kv_cache_usage,
                             tokens_per_second=hb.tokens_per_second)
        out.append(msgspec.convert({**dict(row), "heartbeat": beat}, NodeRecord,
                                   from_attributes=True))
    return out


def _status_filter(request: web.Request) -> str | None:
    status = request.query.get("status")
    if status is not None and status not in _STATUSES:
        raise FieldError(f"'status' must be one of {', '.join(_STATUSES)}, not "
                         f"{status[:40]!r}.", "status")
    return status


async def list_nodes(request: web.Request) -> web.Response:
    page = page_query(request, extra=("status", "model"))
    status = _status_filter(request)
    model = request.query.get("model")
    rows = await db(request).fetch(
        f"""SELECT {_COLUMNS} FROM nodes
            WHERE ($1::uuid IS NULL OR id > $1) AND ($2::text IS NULL OR status = $2)
              AND ($3::text IS NULL OR model_name = $3)
            ORDER BY id LIMIT $4""", page.after, status, model, page.limit + 1)
    nodes = await _with_heartbeats(request, rows[:page.limit])
    return json_response(NodeList(data=nodes,
                                  next_cursor=next_cursor([r["id"] for r in rows], page.limit)))


async def get_node(request: web.Request) -> web.Response:
    node_id = path_id(request, "node_id", "node")
    row = await db(request).fetchrow(f"SELECT {_COLUMNS} FROM nodes WHERE id = $1", node_id)
    if row is None:
        raise NotFound(f"node {node_id} not found")
    (node,) = await _with_heartbeats(request, [row])
    return json_response(node)


async def drain_node(request: web.Request) -> web.Response:
    node_id = path_id(request, "node_id", "node")
    body = await read_body(request, DrainRequest)
    if not await db(request).fetchval("SELECT 1 FROM nodes WHERE id = $1", node_id):
        raise NotFound(f"node {node_id} not found")
    command = NodeCommand(command=CommandKind.DRAIN, reason=body.reason,
                          deadline_seconds=body.deadline_seconds, issued_by="admin-api")
    try:
        msg = await request.app[BUS].nc.request(node_command_subject(node_id),
                                                msgspec.json.encode(command), timeout=5)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise ApiError.conflict("The node's agent did not answer: it is gone or unreachable.",
                                code="agent_unreachable") from None
    try:
        reply = msgspec.json.decode(msg.data, type=CommandReply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # The agent answered, but not in words we know (another version, a bug): its fault,
        # not ours, and not the caller's.
        log.warning("undecodable drain reply", node_id=str(node_id), error=str(exc))
        raise ApiError.bad_gateway("The node's agent answered the drain command with a "
                                   "reply this API cannot read.",
                                   code="bad_agent_reply") from None
    return json_response(DrainResult(accepted=reply.accepted, detail=reply.detail), 202)


async def terminate_node(request: web.Request) -> web.Response:
    node_id = path_id(request, "node_id", "node")
    body = await read_body(request, TerminateRequest)
    fleet = Fleet(request.app[EVENTLOG], actor="admin-api")
    try:
        recorded = await fleet.request_termination(node_id, body.reason)
    except UnknownNode:
        raise NotFound(f"node {node_id} not found") from None
    status = await fleet.status(node_id)
    if not recorded:
        raise ApiError.conflict(f"Node {node_id} is already {status}.", code="node_gone")
    return json_response(TerminateResult(node_id=node_id, status=str(status)), 202)


TAG = "nodes"
ROUTES = (
    Route("GET", "/nodes", list_nodes, "List GPU nodes with their latest heartbeat", TAG,
          response=NodeList, query=(*PAGE_QUERY,
                                    QueryParam("status", "only nodes in this status",
                                               Choice(_STATUSES)),
                                    QueryParam("model", "only nodes serving this model",
                                               Text(max_length=200)))),
    Route("GET", "/nodes/{node_id}", get_node, "Read a node", TAG, response=NodeRecord),
    Route("POST", "/nodes/{node_id}/drain", drain_node,
          "Ask a node's agent to drain: finish in-flight requests, deregister, exit", TAG,
          body=DrainRequest, body_required=False, response=DrainResult, status=202,
          errors=(409, 502)),
    Route("POST", "/nodes/{node_id}/terminate", terminate_node,
          "Terminate a node: the orchestrator drains it, takes its machine down and, for a "
          "deployment's node, launches a replacement if the deployment is below its minimum",
          TAG, body=TerminateRequest, body_required=False, response=TerminateResult,
          status=202, errors=(409,)),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
