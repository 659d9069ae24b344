"""Gateway benchmark: the same load against
  (a) the vLLM simulator directly,
  (b) a bare aiohttp pass-through proxy (written here, as the baseline),
  (c) the gateway with auth, every rate-limit layer, load balancing and usage publishing,
  (d) the gateway again, for a key under spend budgets at its key, environment and tenant
      (each request reserves its worst cost at three budget counters in the same script),
one worker process each, in one run; concurrency 1 and 16, whole answers and streams.
Prints requests/s, p50/p99 latency and Redis's CPU per request (`INFO cpu`, for the gateway
rows), (c) as a ratio of (b), and (d) as a ratio of (c).

`python bench/gateway.py [--seconds 5] [--load wrk|python]`. Run by hand: the figures depend on
the machine, and the load generator shares it with the servers, so compare the ratios, not the
absolute numbers. The load comes from `wrk` (Debian's package) when it is installed: a Python
load generator takes the CPU the servers need and flatters the ratios.

As in production: NATS with authentication (the gateway, the node agent, the monitor and the
outbox relay each connect as their own identity); the node launched (`node.launching` in the
log) before its agent registers, so the monitor accepts it and the gateway routes to it; and
the node's vLLM (the simulator) with its own API key, which the gateway derives from
NODE_API_KEY_SECRET and the bare proxy is given.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from schemas.events import NodeLaunching, Quota
from schemas.ids import uuid7
from services.domain.budgets import Period
from services.domain.catalog import Catalog
from services.domain.fleet import Fleet
from services.infra.bus import Bus
from services.infra.db import create_pool
from services.infra.devstack import DevStack, free_port
from services.infra.eventlog import EventLog
from services.infra.migrate import migrate
from services.infra.natsauth.identities import Role
from services.infra.node_keys import node_api_key

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say something nice."}],
        "max_tokens": 16}
ENDPOINTS = {
    "chat": ("/v1/chat/completions", BODY),
    # Stored (the default): the gateway notes each response's node in Redis, as in production.
    "responses": ("/v1/responses", {"model": MODEL, "input": "Say something nice.",
                                    "max_output_tokens": 16}),
}


# --------------------------------------------------------------------------- (b) bare proxy


def bare_proxy(upstream: str, port: int, upstream_key: str) -> None:
    """What any reverse proxy does: read the body, forward it (with the node's key), stream
    the answer back."""

    async def ctx(app: web.Application) -> object:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        async with session.post(upstream + request.path, data=body,
                                headers={"Content-Type": "application/json",
                                         "Authorization": f"Bearer {upstream_key}"}) as up:
            response = web.StreamResponse(status=up.status, headers={
                "Content-Type": up.headers.get("Content-Type", "application/json")})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    # wrk closes its connections mid-answer when its time is up: not worth a traceback each.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    app = web.Application()
    app.cleanup_ctx.append(ctx)  # type: ignore[arg-type]
    for path, _ in ENDPOINTS.values():
        app.router.add_post(path, forward)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --------------------------------------------------------------------------- load


ERRORS: collections.Counter[tuple[int, str]] = collections.Counter()
"""(status, start of the body) of every failed request, printed after the run."""


async def load(url: str, key: str, concurrency: int, seconds: float, stream: bool,
               request: dict[str, object]) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    body = {**request, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as r:
                answer = await r.read()
                if r.status != 200:
                    errors += 1
                    ERRORS[(r.status, answer[:160].decode(errors="replace"))] += 1
                    continue
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm the connections and the gateway's caches first.
        for _ in range(20):
            async with session.post(url, json=body, headers=headers) as r:
                await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, errors


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {authorization}
"""


async def load_wrk(url: str, key: str, concurrency: int, seconds: float, stream: bool,
                   request: dict[str, object], tmp: Path) -> tuple[float, float, float, int]:
    """wrk's requests/s, p50 and p99 (ms) and non-2xx answers, one wrk thread."""
    script = tmp / "bench.lua"
    script.write_text(WRK_SCRIPT.format(body=_lua_string(json.dumps({**request,
                                                                     "stream": stream})),
                                        authorization=_lua_string(f"Bearer {key}")))
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency",
        "-s", str(script), url, stdout=asyncio.subprocess.PIPE)
    out = (await proc.communicate())[0].decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return (rps, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), int(errors[1]) if errors else 0)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrk_ms(out: str, label: str) -> float:
    found = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if not found:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found[2]]
    return float(found[1]) * scale


async def redis_cpu_seconds(redis: aioredis.Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else \
        values[0] * 1000


async def wait_ready(url: str, path: str = "/health", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url + path) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}{path} not ready")
            await asyncio.sleep(0.1)


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


async def wait_routed(url: str, key: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.post(f"{url}/v1/chat/completions", json=BODY,
                              headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                if r.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway never routed to the node")
            await asyncio.sleep(0.2)


async def prepared(stack: DevStack) -> asyncpg.Pool:
    """The platform's schema and NATS streams on a started DevStack; a pool to its
    PostgreSQL (the caller closes it)."""
    assert stack.nats is not None
    urls = stack.urls
    await migrate(urls.database_url)
    bus = await Bus.connect(urls.nats_url, name="bench", creds=stack.nats.creds(Role.PROVISIONER))
    await bus.ensure_streams()
    await bus.close()
    return await create_pool(urls.database_url)


async def launched(pool: asyncpg.Pool, node_id: uuid.UUID) -> None:
    """As the orchestrator does before asking the cloud: the monitor accepts only launched
    nodes, and the gateway routes only to accepted ones."""
    await Fleet(EventLog(pool), actor="bench").launching(NodeLaunching(
        node_id=node_id, deployment_id=None, cluster_name=f"bench-{node_id.hex[:8]}",
        model_name=MODEL, provider="local", region="local", gpu_type="simulated",
        spot=False, deadline=datetime.now(UTC) + timedelta(hours=1)))


async def start_relay_and_monitor(stack: DevStack, services: dict[str, str]
                                  ) -> list[asyncio.subprocess.Process]:
    """The outbox relay and the monitor, each with its own NATS identity."""
    assert stack.nats is not None
    return [await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.DEVNULL, env={
            **services, "NATS_CREDS": stack.nats.creds(role), "HTTP_PORT": str(free_port())})
        for argv, role in ((["-m", "services.cli", "relay"], Role.RELAY),
                           (["-m", "services.monitor"], Role.MONITOR))]


async def stop_processes(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM to each still running, then wait for all."""
    for p in procs:
        if p.returncode is None:
            p.terminate()
    await asyncio.gather(*(p.wait() for p in procs))


UNLIMITED = Quota(requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**12,
                  concurrency=10_000)
"""A benchmark's tenants: no limit in the way of the load."""


async def unlimited_keys(pool: asyncpg.Pool, names: list[str],
                         context_length: int = 32768) -> list[str]:
    """A tenant, environment and key (plaintext) for each name, none of them limited, and
    the model they call."""
    catalog = Catalog(EventLog(pool))
    keys = []
    for name in names:
        tenant = await catalog.create_tenant(name)
        env = await catalog.create_environment(tenant, "bench", "local", UNLIMITED)
        keys.append((await catalog.create_api_key(env, limits=UNLIMITED)).plaintext)
    await catalog.create_model(MODEL, family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.1"),
                               output_price_per_million=Decimal("0.2"),
                               context_length=context_length)
    return keys


async def start_node(stack: DevStack, pool: asyncpg.Pool, node_secret: str,
                     env_base: dict[str, str], simulator_args: list[str], *,
                     kv_events: str = "") -> tuple[uuid.UUID, str,
                                                   list[asyncio.subprocess.Process]]:
    """A launched node: a simulator and a real agent, as a machine runs them; `kv_events`:
    where its vLLM publishes KV cache events (and its agent reads them). Its id, its vLLM's
    URL and the two processes."""
    assert stack.nats is not None
    node_id = uuid7()
    await launched(pool, node_id)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    kv_flag = ["--kv-events-config", json.dumps({"enable_kv_cache_events": True,
                                                 "publisher": "zmq", "endpoint": kv_events})
               ] if kv_events else []
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.simulator", "--port", str(port), "--model", MODEL,
        "--max-model-len", "32768", *simulator_args, *kv_flag,
        stdout=asyncio.subprocess.DEVNULL,
        env={**env_base, "VLLM_API_KEY": node_api_key(node_secret, node_id)})
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", env={
            **env_base, "NATS_URL": stack.urls.nats_url, "VLLM_URL": url, "MODEL_NAME": MODEL,
            "NODE_ID": str(node_id), "HEARTBEAT_INTERVAL": "1",
            "VLLM_KV_EVENTS_ENDPOINT": kv_events,
            "NATS_CREDS": stack.nats.authority.node_credentials(node_id).text()})
    return node_id, url, [sim, agent]


async def run(seconds: float, tmp: Path, only: set[str], modes: set[str], endpoint: str,
              concurrencies: list[int], load_with: str, lb_strategy: str) -> None:
    stack = DevStack(tmp / "servers")
    stack.start()
    assert stack.nats is not None
    procs: list[asyncio.subprocess.Process] = []
    try:
        urls = stack.urls
        pool = await prepared(stack)
        catalog = Catalog(EventLog(pool))
        tenant = await catalog.create_tenant("bench")
        huge = 10**12
        env = await catalog.create_environment(tenant, "bench", "local", Quota(
            requests_per_minute=10**9, tokens_per_minute=huge, tokens_per_day=huge))
        key = await catalog.create_api_key(env, limits=Quota(
            requests_per_minute=10**9, tokens_per_minute=huge, tokens_per_day=huge,
            concurrency=10_000))
        # The same key again under spend budgets at all three scopes (of their own tenant:
        # a tenant's budget is over every key of it).
        budgeted_tenant = await catalog.create_tenant("bench-budgets")
        budgeted_env = await catalog.create_environment(
            budgeted_tenant, "bench", "local", Quota(requests_per_minute=10**9,
                                                     tokens_per_minute=huge,
                                                     tokens_per_day=huge))
        budgeted = await catalog.create_api_key(budgeted_env, limits=Quota(
            requests_per_minute=10**9, tokens_per_minute=huge, tokens_per_day=huge,
            concurrency=10_000))
        plenty = Decimal("999999")
        await catalog.set_budget("tenant", budgeted_tenant, plenty, Period("month"))
        await catalog.set_budget("environment", budgeted_env, plenty, Period("day"))
        await catalog.set_budget("key", budgeted.key_id, plenty, Period("day"))
        await catalog.create_model(MODEL, family="llama", vram_gb=16,
                                   input_price_per_million=Decimal("0.1"),
                                   output_price_per_million=Decimal("0.2"),
                                   context_length=8192)
        node_id = uuid7()
        await launched(pool, node_id)
        await pool.close()

        sim_port, bare_port, gw_port = free_port(), free_port(), free_port()
        sim = f"http://127.0.0.1:{sim_port}"
        env_base = {**os.environ, "LOG_LEVEL": "warning"}
        services = {**env_base, "DATABASE_URL": urls.database_url, "REDIS_URL": urls.redis_url,
                    "NATS_URL": urls.nats_url, "HTTP_HOST": "127.0.0.1"}
        procs += await start_relay_and_monitor(stack, services)
        node_secret = secrets.token_urlsafe(48)
        node_key = node_api_key(node_secret, node_id)
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.simulator", "--port", str(sim_port), "--model", MODEL,
            stdout=asyncio.subprocess.DEVNULL, env={**env_base, "VLLM_API_KEY": node_key}))
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--bare-proxy", sim, "--port", str(bare_port),
            env={**env_base, "BENCH_UPSTREAM_KEY": node_key}))
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", env={
                **env_base, "NATS_URL": urls.nats_url, "VLLM_URL": sim, "MODEL_NAME": MODEL,
                "NODE_ID": str(node_id), "HEARTBEAT_INTERVAL": "1",
                "NATS_CREDS": stack.nats.authority.node_credentials(node_id).text()}))
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", env={
                **services, "NATS_CREDS": stack.nats.creds(Role.GATEWAY),
                "NODE_API_KEY_SECRET": node_secret, "HTTP_PORT": str(gw_port),
                "TENANT_REQUESTS_PER_MINUTE": str(10**9),
                # Every layer on, the platform-wide one too: each is a key in the script.
                "GLOBAL_REQUESTS_PER_MINUTE": str(10**9), "LB_STRATEGY": lb_strategy,
                "USAGE_SPOOL_DIR": str(tmp / "spool")}))
        await wait_ready(sim)
        await wait_port(bare_port)
        await wait_ready(f"http://127.0.0.1:{gw_port}", "/ready")
        await wait_routed(f"http://127.0.0.1:{gw_port}", key.plaintext)

        await wait_routed(f"http://127.0.0.1:{gw_port}", budgeted.plaintext)

        path, request = ENDPOINTS[endpoint]
        gateway_url = f"http://127.0.0.1:{gw_port}{path}"
        targets = {"simulator": (f"{sim}{path}", node_key),
                   "bare proxy": (f"http://127.0.0.1:{bare_port}{path}", key.plaintext),
                   "gateway": (gateway_url, key.plaintext),
                   "budgets": (gateway_url, budgeted.plaintext)}
        use_wrk = load_with == "wrk"
        print(f"gateway benchmark: {path}, 16 output tokens, {seconds:.0f}s per row, one "
              f"process each, 2 cores shared with the load ({load_with}), LB_STRATEGY="
              f"{lb_strategy}; `budgets`: the gateway, a key under budgets at key, "
              "environment and tenant")
        print(f"{'target':<11} {'mode':<7} {'conc':>4} {'req/s':>8} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'errors':>6} {'redis us/req':>12}")
        results: dict[tuple[str, bool, int], float] = {}
        redis = aioredis.from_url(urls.redis_url)
        for stream in (False, True):
            if ("stream" if stream else "whole") not in modes:
                continue
            for concurrency in concurrencies:
                for name, (url, caller) in targets.items():
                    if only and name.split()[0] not in only:
                        continue
                    cpu = await redis_cpu_seconds(redis)
                    # The simulator is called as the gateway calls it, with the node's key.
                    if use_wrk:
                        rps, p50, p99, errors = await load_wrk(
                            url, caller, concurrency, seconds, stream, request, tmp)
                        took = float(max(1, round(seconds)))
                    else:
                        rps, lat, errors = await load(url, caller, concurrency, seconds,
                                                      stream, request)
                        p50, p99, took = pct(lat, 50), pct(lat, 99), seconds
                    per_request = (await redis_cpu_seconds(redis) - cpu) / max(1, rps * took)
                    results[(name, stream, concurrency)] = rps
                    redis_us = f"{per_request * 1e6:>12.1f}" if name in ("gateway",
                                                                          "budgets") else ""
                    print(f"{name:<11} {'stream' if stream else 'whole':<7} {concurrency:>4} "
                          f"{rps:>8,.0f} {p50:>8.2f} {p99:>8.2f} {errors:>6} {redis_us}",
                          flush=True)
        await redis.aclose()
        for (status, body), count in ERRORS.most_common(5):
            print(f"errors: {count} x {status} {body}")
        for title, over, under in (("gateway / bare proxy (goal: at least 0.60)", "gateway",
                                    "bare proxy"),
                                   ("gateway with budgets / gateway (goal: no drop)", "budgets",
                                    "gateway")):
            print(f"\n{title}")
            for stream in (False, True):
                for concurrency in concurrencies:
                    a = results.get((over, stream, concurrency))
                    b = results.get((under, stream, concurrency))
                    if a and b:
                        print(f"  {'stream' if stream else 'whole':<7} concurrency "
                              f"{concurrency:>2}: {a / b:.2f}")
    finally:
        await stop_processes(procs)
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", default="",
                        help="comma list: simulator,bare,gateway,budgets")
    parser.add_argument("--load", choices=("wrk", "python"),
                        default="wrk" if shutil.which("wrk") else "python")
    parser.add_argument("--modes", default="whole,stream")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    parser.add_argument("--lb-strategy", default="round_robin",
                        help="the gateway's LB_STRATEGY (prefix_aware hashes each prompt)")
    parser.add_argument("--bare-proxy", metavar="UPSTREAM")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.bare_proxy:
        bare_proxy(args.bare_proxy, args.port, os.environ.get("BENCH_UPSTREAM_KEY", ""))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.seconds, Path(tmp), set(filter(None, args.only.split(","))),
                        set(args.modes.split(",")), args.endpoint,
                        [int(c) for c in args.concurrency.split(",")], args.load,
                        args.lb_strategy))


if __name__ == "__main__":
    main()
