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
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.simulator.auth import ApiKeys, auth_middleware
from agent.simulator.config import ConfigError, SimulatorConfig, validated
from agent.simulator.engine import Engine
from agent.simulator.faults import FaultState
from agent.simulator.kv_cache import KvCache
from agent.simulator.kv_publisher import KvEventPublisher, publishing
from agent.simulator.metrics import HTTP_EXCLUDED, EngineMetrics, HttpMetrics
from agent.simulator.prefix_cache import PrefixCache, none_hash
from agent.simulator.prepare import Prepare
from agent.simulator.protocol import (
    ApiError,
    check_cache_salt,
    check_generation_prompt,
    check_stream_options,
    decode_chat,
    decode_completion,
    decode_detokenize,
    decode_embedding,
    decode_rerank,
    decode_responses,
    decode_score,
    decode_tokenize,
    error_body,
    generation_prompt,
)
from agent.simulator.responses import rerank as rerank_body
from agent.simulator.responses import scores as scores_body
from agent.simulator.responses_api import (
    ResponseStore,
    StoredResponse,
    cannot_cancel,
    response_not_found,
    stored,
)
from agent.simulator.scheduler import Scheduler
from agent.simulator.serving import JSON_HEADERS, Serving, error_response, json_response
from agent.simulator.timing import GpuClock
from services.domain.standin_tokenizer import TokenIds

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
        self.engine = Engine(self.scheduler, self.metrics, GpuClock(
            config.prefill_tokens_per_second, config.inter_token_latency,
            config.decode_seconds_per_seq))
        self.http_metrics = HttpMetrics(self.registry)
        self.token_ids = TokenIds()
        self.kv_cache = KvCache(PrefixCache(
            config.kv_cache_tokens // config.block_size, config.block_size,
            root_hash=none_hash(os.environ.get("PYTHONHASHSEED")),
            record_events=config.kv_events_endpoint is not None), self.token_ids, self.metrics)
        self.faults = FaultState(config.faults, config.seed)
        self.prepare = Prepare(config)
        self.serving = Serving(config, self.engine, self.faults)
        self.response_store = ResponseStore()
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

    def previous_response(self, response_id: str | None) -> StoredResponse | None:
        if response_id is None:
            return None
        found = self.response_store.get(response_id)
        if found is None:
            raise response_not_found(response_id)
        return found


SIMULATOR = web.AppKey("simulator", Simulator)
KV_PUBLISHER = web.AppKey("simulator_kv_publisher", KvEventPublisher)
"""The publisher, set when the app starts with a `kv_events_endpoint`."""
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
        check_generation_prompt(req)
        gen = sim.prepare.chat(req, request_id(request, "chatcmpl-", req.request_id))
    except ApiError as exc:
        return error_response(exc)
    gen.cached_tokens = sim.kv_cache.chat(req.cache_salt,
                                          [(m.role, m.text()) for m in req.messages],
                                          add_generation_prompt=generation_prompt(req),
                                          continue_final_message=req.continue_final_message)
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
    gen.cached_tokens = sim.kv_cache.completion(req.cache_salt, req.prompt)
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


async def create_response(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR]
    arrival = sim.engine.now()
    try:
        req = decode_responses(await request.read())
        sim.prepare.check_model(req.model)
        previous = sim.previous_response(req.previous_response_id)
        gen = sim.prepare.responses(req, previous, req.request_id or f"resp_{uuid.uuid4().hex}",
                                    f"msg_{uuid.uuid4().hex}")
    except ApiError as exc:
        return error_response(exc)
    assert gen.responses is not None
    gen.cached_tokens = sim.kv_cache.chat(req.cache_salt, gen.responses.messages)
    resp = await sim.serving.generation(request, gen, arrival)
    # Here only when the answer went out whole (a failed, hung or cut one never arrives).
    if resp.status == 200 and req.store:
        sim.response_store.put(gen.id, stored(gen))
    return resp


async def retrieve_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    found = request.app[SIMULATOR].response_store.get(response_id)
    if found is None:
        return error_response(response_not_found(response_id))
    return json_response(found.body)


async def cancel_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    found = request.app[SIMULATOR].response_store.get(response_id)
    return error_response(response_not_found(response_id) if found is None
                          else cannot_cancel())


async def _scoring(request: web.Request, prefix: str,
                   read: Callable[[bytes], tuple[str | None, Any, Any, Callable[..., bytes]]]
                   ) -> web.StreamResponse:
    """Score and rerank: a pair of texts (or lists of them) scored as one pooling request;
    `read` gives the model, the two sides and how the answer is written."""
    sim = request.app[SIMULATOR]
    arrival = sim.engine.now()
    try:
        model, left, right, answer = read(await request.read())
        sim.prepare.check_model(model)
        values, prompt_tokens = sim.prepare.scores(left, right)
    except ApiError as exc:
        return error_response(exc)
    request_id = request_id_of(request, prefix)
    return await sim.serving.pooling(
        request, len(values), prompt_tokens, arrival,
        lambda: answer(request_id, values, prompt_tokens))


async def score(request: web.Request) -> web.StreamResponse:
    model = request.app[SIMULATOR].config.model

    def read(raw: bytes) -> tuple[str | None, Any, Any, Callable[..., bytes]]:
        req = decode_score(raw)
        return req.model, req.text_1, req.text_2, lambda rid, values, tokens: scores_body(
            rid, int(time.time()), model, values, tokens)

    return await _scoring(request, "score-", read)


async def rerank(request: web.Request) -> web.StreamResponse:
    model = request.app[SIMULATOR].config.model

    def read(raw: bytes) -> tuple[str | None, Any, Any, Callable[..., bytes]]:
        req = decode_rerank(raw)
        return req.model, req.query, req.documents, lambda rid, values, tokens: rerank_body(
            rid, model, req.documents, values, req.top_n, tokens)

    return await _scoring(request, "rerank-", read)


def request_id_of(request: web.Request, prefix: str) -> str:
    # vLLM's `_base_request_id`: the X-Request-Id header, else a random id.
    return prefix + (request.headers.get("X-Request-Id") or uuid.uuid4().hex)


async def tokenize(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    try:
        body = sim.prepare.tokenize(decode_tokenize(await request.read()))
    except ApiError as exc:
        return error_response(exc)
    return json_response(msgspec.json.encode(body))


async def detokenize(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    try:
        body = sim.prepare.detokenize(decode_detokenize(await request.read()))
    except ApiError as exc:
        return error_response(exc)
    return json_response(msgspec.json.encode(body))


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


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's (served when VLLM_SERVER_DEV_MODE=1): empty the prefix cache, as benchmarks do
    between runs."""
    request.app[SIMULATOR].kv_cache.reset()
    return web.Response(status=200)


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


async def _kv_events_ctx(app: web.Application) -> AsyncIterator[None]:
    sim = app[SIMULATOR]
    if sim.config.kv_events_endpoint is None:
        yield
        return
    with publishing(sim.kv_cache, sim.config.kv_events_endpoint,
                    sim.config.kv_events_topic) as app[KV_PUBLISHER]:
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
    app.cleanup_ctx.append(_kv_events_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/admin/faults", get_faults)
    app.router.add_post("/admin/faults", post_faults)
    app.router.add_delete("/admin/faults", delete_faults)
    return app
