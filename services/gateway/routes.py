"""The inference routes: authenticate, check the model, limit, proxy, settle, meter."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import cast

import asyncpg
import msgspec
import structlog
from aiohttp import web

from schemas.events import UsageRecorded
from services.domain.usage_queries import (
    UsageQuery,
    UsageQueryError,
    UsageReport,
    parse_usage_query,
    usage_report,
)
from services.gateway import spend
from services.gateway.auth import AuthError, AuthThrottled, Principal
from services.gateway.balancer import RouteHint
from services.gateway.budget_spend import budget_spender
from services.gateway.forwarding import Progress, Stored, UpstreamFailure
from services.gateway.gateway import GATEWAY, GATEWAY_SETTINGS, Gateway
from services.gateway.middleware import CLIENT_CLOSED_REQUEST, REAL_IP, deadline_expired
from services.gateway.models import ModelInfo
from services.gateway.nodes import FINAL_STATUSES, NodeView
from services.gateway.prefix_routing import SESSION_HEADER, route_key
from services.gateway.protocol import BadRequest, InferenceRequest, limit_output
from services.gateway.ratelimit import (
    BudgetCap,
    Decision,
    Layer,
    Limits,
    LimitSubject,
    Reservation,
)
from services.gateway.ratelimit.in_flight import InFlight
from services.gateway.ratelimit.planning import money_checks
from services.gateway.request_parsing import response_id_param
from services.gateway.response_owners import Owner, OwnersUnavailable
from services.gateway.roles import Action, allowed
from services.gateway.roles import refusal as refusal_message
from services.gateway.settings import GatewaySettings
from services.infra.errors import ApiError
from services.infra.http import DB, REQUEST_ID

log = structlog.get_logger("gateway")

BUDGET_MAX_TOKENS_HEADER = "x-budget-max-tokens"
"""On an answer whose output limit a spend budget lowered: the output tokens a sequence it
ran with."""

USAGE_REPORTS = web.AppKey("usage_reports", InFlight)
"""The usage reports this process is computing (USAGE_MAX_CONCURRENT at most)."""


def limits_for(p: Principal, s: GatewaySettings,
               budgets: tuple[BudgetCap, ...] = ()) -> Limits:
    """A key's own limits, its environment's (or the default), the platform's, and the spend
    budgets over it (`spend.caps`)."""
    return Limits(
        key_requests_per_minute=p.key_requests_per_minute,
        # An environment's own 0 pauses it; only "not set" (None) takes the default.
        environment_requests_per_minute=(
            p.environment_requests_per_minute if p.environment_requests_per_minute is not None
            else s.environment_requests_per_minute or None),
        tenant_requests_per_minute=s.tenant_requests_per_minute or None,
        global_requests_per_minute=s.global_requests_per_minute or None,
        key_tokens_per_minute=p.key_tokens_per_minute,
        key_tokens_per_day=p.key_tokens_per_day,
        environment_tokens_per_minute=p.environment_tokens_per_minute,
        environment_tokens_per_day=p.environment_tokens_per_day,
        key_concurrency=p.key_concurrency, budgets=budgets)


async def authenticate(request: web.Request, action: Action) -> Principal:
    """The caller's principal, if its key's role may do `action` (roles.py); 403 if not,
    before anything is spent or read."""
    gw = request.app[GATEWAY]
    try:
        principal = await gw.auth.authenticate(request.headers.get("Authorization"),
                                               request.get(REAL_IP))
    except AuthThrottled as exc:
        raise ApiError.rate_limited(exc.message, headers=exc.headers,
                                    code="too_many_auth_failures") from None
    except AuthError as exc:
        if exc.status == 403:
            raise ApiError.permission(exc.message, code=exc.reason) from None
        raise ApiError.authentication(exc.message) from None
    structlog.contextvars.bind_contextvars(tenant_id=principal.tenant_id,
                                           environment_id=principal.environment_id,
                                           key_id=principal.key_id)
    if not allowed(principal.role, action):
        raise ApiError.permission(refusal_message(principal.role, action),
                                  code="insufficient_permissions")
    return principal


async def admit(gw: Gateway, principal: Principal, tokens: int,
                cost: tuple[int, int] = (0, 0)) -> Decision:
    """Every limit of the key, its environment, tenant and the platform, `tokens` reserved,
    and (when budgets are over the key) the request's `cost` (the most it can cost, the
    least it can run with; nano-dollars) at each: the decision, or the 429 (or 503) that
    refuses the request."""
    caps = gw.caps.caps(principal.budgets, time.time()) if principal.budgets else ()
    decision = await gw.limiter.acquire(
        LimitSubject(principal.key_id, principal.environment_id, principal.tenant_id),
        limits_for(principal, gw.settings, caps), tokens, *cost)
    if not decision.allowed:
        raise refusal(decision, principal)
    return decision


def refusal(decision: Decision, principal: Principal | None = None) -> ApiError:
    if decision.layer in spend.BUDGET_LAYERS and principal is not None:
        assert decision.layer is not None
        return ApiError(429, spend.refusal_message(decision.layer, principal.budgets,
                                                   decision.retry_after, datetime.now(UTC)),
                        type="insufficient_quota", code="insufficient_quota",
                        headers=decision.headers)
    if decision.layer is Layer.UNAVAILABLE:
        return ApiError.unavailable("Rate limiting is unavailable; retry shortly.",
                                    headers=decision.headers)
    layer = str(decision.layer).replace("_", " ")
    return ApiError.rate_limited(f"Rate limit reached ({layer}). Retry after "
                                 f"{decision.headers.get('Retry-After', '1')}s.",
                                 headers=decision.headers)


async def models(request: web.Request) -> web.Response:
    await authenticate(request, Action.READ)
    body = request.app[GATEWAY].models.list_body
    return web.Response(body=body, content_type="application/json")


async def off_hot_path_budget(request: web.Request, principal: Principal) -> Decision:
    """Spend one of the key's calls that are PostgreSQL work off the hot path (usage reports,
    tenant self-service: USAGE_REQUESTS_PER_MINUTE); 429 past it."""
    gw = request.app[GATEWAY]
    decision = await gw.limiter.acquire_usage(
        LimitSubject(principal.key_id, principal.environment_id, principal.tenant_id),
        gw.settings.usage_requests_per_minute or None)
    if not decision.allowed:
        raise refusal(decision)
    return decision


async def usage(request: web.Request) -> web.Response:
    """The caller's own tenant's usage: totals per hour or day (see usage_queries)."""
    principal = await authenticate(request, Action.READ)
    gw = request.app[GATEWAY]
    # Its own budget, before the query: each report is a PostgreSQL aggregate.
    decision = await off_hot_path_budget(request, principal)
    if "tenant_id" in request.query:
        raise ApiError.invalid_request("'tenant_id' is implied by your API key; leave it out.",
                                       param="tenant_id")
    try:
        query = parse_usage_query(request.query)
    except UsageQueryError as exc:
        raise ApiError.invalid_request(exc.message, param=exc.param) from None
    query = dataclasses.replace(query, tenant_id=uuid.UUID(principal.tenant_id))
    # After the per-key budget: that one is Redis's, this one guards the PostgreSQL pool.
    reports = request.app[USAGE_REPORTS]
    if not reports.enter():
        gw.limiter.metrics.exceeded.labels(str(reports.layer)).inc()
        raise refusal(reports.refusal())
    try:
        report = await _usage_report(request.app[DB], query,
                                     gw.settings.usage_statement_timeout_ms)
    except asyncpg.QueryCanceledError:
        # USAGE_STATEMENT_TIMEOUT_MS cut it short: the client asked for more than we serve.
        raise ApiError.timeout("The usage report took too long to compute; ask for a "
                               "shorter period or a coarser granularity.") from None
    finally:
        reports.leave()
    return web.Response(body=msgspec.json.encode(report), content_type="application/json",
                        headers=decision.headers)


async def budgets(request: web.Request) -> web.Response:
    """GET /v1/budgets: the spend budgets over the caller's key (its own, its environment's,
    its tenant's), each with its current period and what billing recorded in it."""
    principal = await authenticate(request, Action.READ)
    gw = request.app[GATEWAY]
    decision = await off_hot_path_budget(request, principal)  # PostgreSQL work
    caps = spend.caps(principal.budgets, datetime.now(UTC))
    subject = LimitSubject(principal.key_id, principal.environment_id, principal.tenant_id)
    checks = money_checks(subject, caps)
    reports = request.app[USAGE_REPORTS]
    if not reports.enter():
        gw.limiter.metrics.exceeded.labels(str(reports.layer)).inc()
        raise refusal(reports.refusal())
    try:
        spent = await budget_spender(request.app[DB])(subject, checks)
    finally:
        reports.leave()
    return web.Response(body=msgspec.json.encode(spend.budget_views(principal, caps, spent)),
                        content_type="application/json", headers=decision.headers)


async def _usage_report(db: asyncpg.Pool[asyncpg.Record], query: UsageQuery,
                        timeout_ms: int) -> UsageReport:
    """The report, under its own statement timeout (0: the pool's), shorter than the pool's:
    SET LOCAL holds for this transaction only, so the connection goes back to the pool as it
    came."""
    async with db.acquire() as conn, conn.transaction(readonly=True):
        if timeout_ms > 0:
            await conn.execute("SELECT set_config('statement_timeout', $1, true)",
                               str(timeout_ms))
        # usage_report only calls fetch(), which a connection has as a pool does.
        return await usage_report(cast("asyncpg.Pool[asyncpg.Record]", conn), query)


def inference(endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _inference(request, endpoint)

    handler.__name__ = f"{endpoint}_handler"
    return handler


async def _inference(request: web.Request, endpoint: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.monotonic()
    principal = await authenticate(request, Action.INFER)
    try:
        req = gw.parse_request(await request.read(), endpoint, principal.tenant_id)
    except BadRequest as exc:
        raise ApiError.invalid_request(exc.message, exc.param, exc.code) from None
    if gw.models.get(req.model) is None:
        raise ApiError.not_found(f"The model `{req.model}` does not exist or you do not have "
                                 "access to it.", param="model", code="model_not_found")
    pinned: NodeView | None = None
    if req.previous_response_id is not None:
        pinned = await holder(gw, req.previous_response_id, principal.tenant_id,
                              param="previous_response_id")
        if pinned.model != req.model:
            raise ApiError.invalid_request(
                f"The previous response was made by the model `{pinned.model}`; continue it "
                "with the same model.", param="model", code="model_mismatch")
    on_stored = stored_by(gw, principal.tenant_id) if req.endpoint == "responses" else None
    if pinned is None and not gw.proxy.has_nodes(req.model):
        # Before the limiter: a request nobody can serve must not spend the tenant's quota.
        gw.metrics.no_node.labels(req.model).inc()
        raise ApiError.unavailable(f"No node is serving the model '{req.model}' right now. "
                                   "Retry shortly.", headers={"Retry-After": "1"})
    model = gw.models.get(req.model)
    assert model is not None
    # A continued response's prompt holds the stored conversation, which is not in the body:
    # up to the whole context.
    prompt_bytes = model.context_length if req.previous_response_id else len(req.raw)
    cost = (gw.pricer.bounds(model, prompt_bytes, req.output_bound, req.sequences)
            if principal.budgets else (0, 0))
    decision = await admit(gw, principal, req.reserved_tokens, cost)
    headers = decision.headers
    if decision.reservation is not None and decision.reservation.money < cost[0]:
        req, headers = _within_budget(gw, req, model, prompt_bytes, decision)
    request_id = request[REQUEST_ID]
    # Kept alive while the request runs, streamed or not: a whole answer may take longer than
    # a lease (REQUEST_TIMEOUT above CONCURRENCY_LEASE_SECONDS).
    lease = gw.leases.hold(decision.reservation) if decision.reservation is not None else None
    progress = Progress()
    try:
        result = await gw.proxy.forward(
            request, req, request_id, headers, progress, pinned=pinned, on_stored=on_stored,
            route=_route_hint(gw, req, principal.tenant_id, request.headers.get(SESSION_HEADER))
            if gw.balancer.keyed and pinned is None else None)
    except UpstreamFailure as failure:
        _finish(gw, decision.reservation, req, principal, request_id, started, progress,
                failure.status)
        raise _upstream_error(failure) from None
    except asyncio.CancelledError:
        # Cut off by the deadline (the middleware answers 504) or by the client hanging up:
        # the quota and its concurrency slot are settled, what was delivered is billed.
        _finish(gw, decision.reservation, req, principal, request_id, started, progress,
                504 if deadline_expired(request) else CLIENT_CLOSED_REQUEST)
        raise
    except Exception:
        # Whatever went wrong (the middleware answers 500), the reservation is settled and
        # what was delivered is billed.
        _finish(gw, decision.reservation, req, principal, request_id, started, progress, 500)
        raise
    finally:
        if lease is not None:
            gw.leases.drop(lease)
    _finish(gw, decision.reservation, req, principal, request_id, started, progress,
            CLIENT_CLOSED_REQUEST if result.client_gone else result.status)
    return result.response


def _within_budget(gw: Gateway, req: InferenceRequest, model: ModelInfo, prompt_bytes: int,
                   decision: Decision) -> tuple[InferenceRequest, dict[str, str]]:
    """A request admitted with what was left of a budget, less than its worst case: its
    output limit comes down to what that pays for, so the node stops it at the budget (the
    answer ends as any that reaches its limit: finish_reason `length`, usage, `[DONE]`).
    The client is told the limit it ran with."""
    assert decision.reservation is not None
    per_sequence = gw.pricer.output_limit(model, prompt_bytes, req.sequences,
                                          decision.reservation.money,
                                          req.output_bound // req.sequences)
    gw.metrics.budget_limited.labels(req.endpoint).inc()
    return (limit_output(req, per_sequence),
            {**decision.headers, BUDGET_MAX_TOKENS_HEADER: str(per_sequence)})


def stored_by(gw: Gateway, tenant_id: str) -> Stored:
    async def remember(response_id: str, node_id: str) -> None:
        await gw.owners.remember(response_id, Owner(tenant_id, node_id))
    return remember


async def holder(gw: Gateway, response_id: str, tenant_id: str, *,
                 param: str | None) -> NodeView:
    """The node holding the caller's stored response `response_id`; 404 when the gateway
    knows of no such response of this tenant, or when its node has left."""
    try:
        owner = await gw.owners.owner(response_id, tenant_id)
    except OwnersUnavailable:
        raise ApiError.unavailable("Stored responses cannot be looked up right now. Retry "
                                   "shortly.", headers={"Retry-After": "1"}) from None
    if owner is None:
        raise ApiError.not_found(f"Response with id '{response_id}' not found.", param=param,
                                 code="response_not_found")
    node = gw.table.nodes.get(owner.node_id)
    if node is None or node.status in FINAL_STATUSES:
        raise ApiError.not_found(
            f"Response with id '{response_id}' is no longer available: the node that stored "
            "it has left the platform, and its stored responses with it. Start again without "
            "it.", param=param, code="response_gone")
    return node


async def stored_response(request: web.Request) -> web.Response:
    """GET /v1/responses/{id} (reading: any role) and DELETE (inference roles): the caller's
    own stored response, from the node that holds it."""
    deleting = request.method == "DELETE"
    principal = await authenticate(request, Action.INFER if deleting else Action.READ)
    gw = request.app[GATEWAY]
    try:
        response_id = response_id_param(request.match_info["response_id"], "response_id")
    except BadRequest as exc:
        raise ApiError.invalid_request(exc.message, exc.param, exc.code) from None
    assert response_id is not None
    # A request like any other for the rate limits (it spends no tokens).
    decision = await admit(gw, principal, 0)
    try:
        node = await holder(gw, response_id, principal.tenant_id, param=None)
        if deleting:
            return await _delete_stored(gw, response_id, decision.headers)
        try:
            status, body = await gw.proxy.fetch(node, "GET", f"/v1/responses/{response_id}",
                                                request[REQUEST_ID])
        except UpstreamFailure as failure:
            raise _upstream_error(failure) from None
    finally:
        if decision.reservation is not None:
            gw.limiter.settle_nowait(decision.reservation, 0)
    return web.Response(body=body, status=status, content_type="application/json",
                        headers=decision.headers)


async def _delete_stored(gw: Gateway, response_id: str,
                         headers: dict[str, str]) -> web.Response:
    """vLLM has no route to delete a stored response: the gateway forgets where it is, which
    puts it out of everyone's reach (nobody else could reach it anyway), and the node's
    memory lets it go when the node ends. (The caller found its node first: another
    tenant's id, or one whose node has gone, is a 404 like any other.)"""
    try:
        await gw.owners.forget(response_id)
    except OwnersUnavailable:
        raise ApiError.unavailable("Stored responses cannot be deleted right now. Retry "
                                   "shortly.", headers={"Retry-After": "1"}) from None
    body = msgspec.json.encode({"id": response_id, "object": "response", "deleted": True})
    return web.Response(body=body, content_type="application/json", headers=headers)


def _upstream_error(failure: UpstreamFailure) -> ApiError:
    if failure.status == 504:
        return ApiError.timeout(failure.message)
    if failure.status == 503:
        return ApiError.unavailable(failure.message, headers={"Retry-After": "1"})
    return ApiError.bad_gateway(failure.message)


def _finish(gw: Gateway, reservation: Reservation | None, req: InferenceRequest,
            principal: Principal, request_id: str, started: float, progress: Progress,
            status: int) -> None:
    """Settle the reservation and meter the request, both off the response's path."""
    prompt, completion = progress.prompt_tokens, progress.completion_tokens
    node_id = progress.node_id
    node = gw.table.nodes.get(node_id) if node_id else None
    region = node.region if node else principal.region
    if reservation is not None:
        spent = 0
        if reservation.money_windows and (model := gw.models.get(req.model)) is not None:
            spent = gw.pricer.actual(model, prompt, completion, region)
        gw.limiter.settle_nowait(reservation, prompt + completion, spent)
    if prompt or completion:
        gw.metrics.child(gw.metrics.tokens, req.model, principal.tenant_id).inc(
            prompt + completion)
    gw.usage.submit(UsageRecorded(
        request_id=request_id, tenant_id=gw.uuid_of(principal.tenant_id),
        environment_id=gw.uuid_of(principal.environment_id),
        api_key_id=gw.uuid_of(principal.key_id), model=req.model, endpoint=req.endpoint,
        region=region,
        node_id=gw.uuid_of(node_id) if node_id else None, prompt_tokens=prompt,
        completion_tokens=completion, latency_ms=round((time.monotonic() - started) * 1000, 3),
        time_to_first_token_ms=(round(progress.time_to_first_token * 1000, 3)
                                if progress.time_to_first_token is not None else None),
        status=status, streamed=req.stream, resumed=progress.resumed))


def add_routes(app: web.Application) -> None:
    # Set here, before the app is frozen: per process, like every other cache of the gateway.
    app[USAGE_REPORTS] = InFlight(app[GATEWAY_SETTINGS].usage_max_concurrent,
                                  Layer.USAGE_REPORTS_IN_FLIGHT)
    app.router.add_post("/v1/chat/completions", inference("chat"))
    app.router.add_post("/v1/completions", inference("completions"))
    app.router.add_post("/v1/embeddings", inference("embeddings"))
    app.router.add_post("/v1/responses", inference("responses"))
    app.router.add_get("/v1/responses/{response_id}", stored_response)
    app.router.add_delete("/v1/responses/{response_id}", stored_response)
    app.router.add_post("/v1/rerank", inference("rerank"))
    app.router.add_post("/v1/score", inference("score"))
    app.router.add_post("/tokenize", inference("tokenize"))
    app.router.add_post("/detokenize", inference("detokenize"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/budgets", budgets)


def _route_hint(gw: Gateway, req: InferenceRequest, tenant_id: str,
                session: str | None) -> RouteHint:
    """What prefix_aware and kv_aware route `req` by; its prompt's blocks are salted as the
    node's cache is (req.cache_salt, the tenant), and only read if kv_aware asks."""
    prompts, endpoint, body, salt = gw.prompts, req.endpoint, req.body, req.cache_salt
    return RouteHint(route_key(endpoint, body, tenant_id, session),
                     lambda size: prompts.keys(endpoint, body, salt, size))
