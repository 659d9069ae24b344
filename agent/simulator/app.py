"""The HTTP server: vLLM's OpenAI-compatible routes, plus ``/admin/faults``. Given API keys,
it guards its routes as ``vllm serve --api-key`` does (see auth.py).

Serve it with ``handler_cancellation=True`` (``python -m agent.simulator`` does) so a client
that leaves is noticed at once; otherwise within DISCONNECT_POLL seconds (see engine.py).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.simulator.auth import ApiKeys, auth_middleware
from agent.simulator.config import ConfigError, SimulatorConfig, validated
from agent.simulator.engine import Engine
from agent.simulator.faults import FaultState
from agent.simulator.generation import chat_text
from agent.simulator.metrics import HTTP_EXCLUDED, EngineMetrics, HttpMetrics
from agent.simulator.prefix_cache import PrefixCache
from agent.simulator.prepare import Prepare, completion_prompts
from agent.simulator.protocol import (
    ApiError,
    check_cache_salt,
    check_stream_options,
    decode_chat,
    decode_completion,
    decode_embedding,
    error_body,
)
from agent.simulator.scheduler import Scheduler
from agent.simulator.serving import JSON_HEADERS, Serving, error_response, json_response

VLLM_VERSION = "0.34.0"
CRASH_EXIT_CODE = 70

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    """Everything one app serves from; its state lives here, not in modules."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.scheduler = Scheduler(config.max_num_seqs, config.kv_cache_tokens,
                                   config.block_size)
        self.metrics = EngineMetrics(self.registry, config.model, self.scheduler)
        self.engine = Engine(self.scheduler, self.metrics)
        self.http_metrics = HttpMetrics(self.registry)
        self.prefix_cache = PrefixCache(config.kv_cache_tokens // config.block_size,
                                        config.block_size)
        self.faults = FaultState(config.faults, config.seed)
        self.prepare = Prepare(config)
        self.serving = Serving(config, self.engine, self.faults)
        created = int(time.time())
        self.models_body = msgspec.json.encode({"object": "list", "data": [{
            "id": config.model, "object": "model", "created": created, "owned_by": "vllm",
            "root": config.model, "parent": None, "max_model_len": config.max_model_len,
            "permission": [{
                "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                "created": created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None,
                "is_blocking": False}],
        }]})

    def query_prefix_cache(self, salt: str | None, prompts: list[str]) -> None:
        for prompt in prompts:
            queried, hit = self.prefix_cache.query(salt, prompt)
            self.metrics.prefix_cache_queries.inc(queried)
            self.metrics.prefix_cache_hits.inc(hit)


SIMULATOR = web.AppKey("simulator", Simulator)
CRASH: web.AppKey[Callable[[], None]] = web.AppKey("simulator_crash")
"""Called by the `exit` fault; an in-process test may replace it to survive."""


def _crash() -> None:
    os._exit(CRASH_EXIT_CODE)


def request_id(request: web.Request, prefix: str, given: str | None) -> str:
    # vLLM's order: the X-Request-Id header, else the body's request_id, else a random id.
    return prefix + (request.headers.get("X-Request-Id") or given or os.urandom(16).hex())


# --------------------------------------------------------------------------- OpenAI routes


async def chat_completions(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    arrival = sim.engine.now()
    try:
        req = decode_chat(await request.read())
        check_stream_options(req)
        check_cache_salt(req.cache_salt)
        gen = sim.prepare.chat(req, request_id(request, "chatcmpl-", req.request_id))
    except ApiError as exc:
        return error_response(exc)
    sim.query_prefix_cache(req.cache_salt, [chat_text([(m.role, m.text())
                                                       for m in req.messages])])
    return await sim.serving.generation(request, gen, arrival)


async def completions(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    arrival = sim.engine.now()
    try:
        req = decode_completion(await request.read())
        check_stream_options(req)
        check_cache_salt(req.cache_salt)
        gen = sim.prepare.completion(req, request_id(request, "cmpl-", req.request_id))
    except ApiError as exc:
        return error_response(exc)
    sim.query_prefix_cache(req.cache_salt, [k for k, _, _ in completion_prompts(req.prompt)])
    return await sim.serving.generation(request, gen, arrival)


async def embeddings(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    arrival = sim.engine.now()
    try:
        req = decode_embedding(await request.read())
        check_cache_salt(req.cache_salt)
        vectors, prompt_tokens = sim.prepare.embeddings(req)
    except ApiError as exc:
        return error_response(exc)
    return await sim.serving.embeddings(request, req, request_id(request, "embd-",
                                                                 req.request_id),
                                        vectors, prompt_tokens, arrival)


async def models(request: web.Request) -> web.Response:
    return json_response(request.app[SIMULATOR].models_body)


async def health(request: web.Request) -> web.Response:
    unhealthy = request.app[SIMULATOR].faults.current.health_503
    return web.Response(status=503 if unhealthy else 200, headers={"Server": "uvicorn"})


async def version(request: web.Request) -> web.Response:
    return json_response(msgspec.json.encode({"version": VLLM_VERSION}))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SIMULATOR].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------- admin routes


async def get_faults(request: web.Request) -> web.Response:
    return json_response(msgspec.json.encode(request.app[SIMULATOR].faults.current))


async def post_faults(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    try:
        faults = sim.faults.update(msgspec.json.decode(await request.read()))
    except (msgspec.DecodeError, ConfigError) as exc:
        return json_response(error_body(str(exc), "BadRequestError", 400), 400)
    body = msgspec.json.encode(faults)
    if not faults.exit:
        return json_response(body)
    # Answer first, so the caller knows it was taken, then die as a crash would.
    resp = web.StreamResponse(headers=JSON_HEADERS)
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body)
    await resp.write_eof()
    request.app[CRASH]()
    return resp


async def delete_faults(request: web.Request) -> web.Response:
    return json_response(msgspec.json.encode(request.app[SIMULATOR].faults.reset()))


# --------------------------------------------------------------------------- the app


@web.middleware
async def fastapi_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and methods answered as FastAPI (under vLLM) answers them."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        return web.Response(body=b'{"detail":"Method Not Allowed"}', status=405,
                            headers={**JSON_HEADERS, "Allow": ", ".join(exc.allowed_methods)})
    except web.HTTPNotFound:
        return web.Response(body=b'{"detail":"Not Found"}', status=404, headers=JSON_HEADERS)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """vLLM's `http_requests_total`: inside the API key check (a refused key is not counted,
    as in vLLM, where the instrumentator runs inside the authentication middleware)."""
    response = await handler(request)
    resource = request.match_info.route.resource
    name = resource.canonical if resource is not None else "none"
    if name not in HTTP_EXCLUDED:
        request.app[SIMULATOR].http_metrics.count(name, request.method, response.status)
    return response


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SIMULATOR].engine.stopping.clear()  # a runner may serve the same app again
    yield


async def _on_shutdown(app: web.Application) -> None:
    # Runs before aiohttp waits for handlers: requests hung by a fault end now instead of
    # holding the shutdown for its whole timeout; the others get that timeout to finish.
    app[SIMULATOR].engine.stopping.set()


def create_app(config: SimulatorConfig, *, api_keys: Iterable[str] = ()) -> web.Application:
    """A vLLM-compatible OpenAI server for `config` (ConfigError when out of range); with
    `api_keys`, one of them is required as vLLM's `--api-key` requires it."""
    keys = ApiKeys(api_keys)
    # Outermost, as in vLLM: an unknown /v1 path without the key is a 401, not a 404.
    middlewares: list[Middleware] = [count_requests, fastapi_errors]
    if keys:
        middlewares.insert(0, auth_middleware(keys))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app[SIMULATOR] = Simulator(validated(config))
    app[CRASH] = _crash
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_engine_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/faults", get_faults)
    app.router.add_post("/admin/faults", post_faults)
    app.router.add_delete("/admin/faults", delete_faults)
    return app
