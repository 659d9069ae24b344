"""Routing benchmark (issue 15): the same multi-turn trace through the real gateway for each
load-balancing strategy, over N simulated nodes whose timing is vLLM's shape (prefill of
what the prefix cache does not hold, one request after another; agent/simulator/timing.py).

Traces:
  shared  T tenants, each with a long system prompt, U users each, multi-turn conversations
          (the llm-d shape, scaled to this machine): the tenants' prompts together are larger
          than one node's KV cache, so where a conversation goes decides whether it is cached;
  unique  the same load with no shared prefix at all (every prompt fresh).

For each strategy it prints TTFT p50/p90/p99 (client side, through the gateway), output
tokens/s, the nodes' prefix-cache hit rate (`vllm:prefix_cache_hits` / `_queries`, from each
node's /metrics) and errors, then each as a ratio of round_robin's. `--gateways 1,2` runs it
behind one gateway process and behind two (the client alternates).

`python bench/routing.py [--nodes 8] [--seconds 20] [--gateways 1,2] [--traces shared,unique]`.
Run by hand: the figures depend on the machine; compare the ratios. Every node's prefix cache
is emptied (POST /reset_prefix_cache) before each row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.infra.devstack import DevStack, free_port
from services.infra.natsauth.identities import Role

sys.path.insert(0, str(Path(__file__).parent))
from gateway import (  # (bench/gateway.py)
    MODEL,
    pct,
    prepared,
    start_node,
    start_relay_and_monitor,
    stop_processes,
    unlimited_keys,
    wait_ready,
)

STRATEGIES = ("round_robin", "least_load", "prefix_aware", "kv_aware")

# The simulated GPU, scaled to this machine (8 nodes share 2 cores with everything else): an
# H100 prefills ~20k tokens/s; here 6k, so a miss on a 1,500-token prompt costs ~0.25 s.
SIM = ["--prefill-tokens-per-second", "6000", "--ttft", "0.01", "--itl", "0.01",
       "--decode-seconds-per-seq", "0.0002", "--kv-cache-tokens", "12000",
       "--max-num-seqs", "64"]
OUTPUT_TOKENS = 16


@dataclass
class Conversation:
    key: str
    system: str
    user: str
    messages: list[dict[str, str]] = field(default_factory=list)


def system_prompt(tenant: int) -> str:
    words = [f"t{tenant}r{i}" for i in range(1500)]  # a token each: ~1,500 tokens
    return f"You are the assistant of company {tenant}. Rules: " + " ".join(words)


def fresh(rng: random.Random, size: int) -> str:
    return " ".join(f"w{rng.randrange(10**9)}" for _ in range(size))


@dataclass
class Row:
    ttft: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    elapsed: float = 0.0
    hit_rate: float = 0.0


async def turn(s: aiohttp.ClientSession, url: str, key: str, messages: list[dict[str, str]],
               row: Row) -> str:
    started = time.perf_counter()
    body = {"model": MODEL, "messages": messages, "max_tokens": OUTPUT_TOKENS, "stream": True,
            "stream_options": {"include_usage": True}}
    text: list[str] = []
    first: float | None = None
    async with s.post(f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status != 200:
            row.errors += 1
            await r.read()
            return ""
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            if first is None:
                first = time.perf_counter() - started
            chunk = line[6:].decode()
            if '"content":"' in chunk:
                text.append(chunk.split('"content":"', 1)[1].split('"', 1)[0])
            if '"completion_tokens":' in chunk and '"choices":[]' in chunk:
                row.output_tokens += int(chunk.split('"completion_tokens":', 1)[1]
                                         .split(",", 1)[0].split("}", 1)[0])
    if first is not None:
        row.ttft.append(first)
    return "".join(text)


async def user_loop(s: aiohttp.ClientSession, urls: list[str], conversation: Conversation,
                    trace: str, deadline: float, row: Row, rng: random.Random) -> None:
    turns = 0
    while time.perf_counter() < deadline:
        if trace == "unique" or turns % 4 == 0:  # a new conversation every 4 turns
            system = conversation.system if trace == "shared" else fresh(rng, 1500)
            conversation.messages = [{"role": "system", "content": system}]
        conversation.messages.append({"role": "user", "content": fresh(rng, 40)})
        url = urls[turns % len(urls)]
        answer = await turn(s, url, conversation.key, conversation.messages, row)
        conversation.messages.append({"role": "assistant", "content": answer or "ok"})
        turns += 1


async def cache_counts(s: aiohttp.ClientSession, nodes: list[str]) -> tuple[float, float]:
    queried = hit = 0.0
    for node in nodes:
        async with s.get(f"{node}/metrics") as r:
            text = await r.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:prefix_cache_queries_total":
                    queried += sample.value
                elif sample.name == "vllm:prefix_cache_hits_total":
                    hit += sample.value
    return queried, hit


async def run_row(urls: list[str], nodes: list[str], keys: list[str], trace: str,
                  users_per_tenant: int, seconds: float) -> Row:
    row = Row()
    rng = random.Random(7)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for node in nodes:
            async with s.post(f"{node}/reset_prefix_cache") as r:
                assert r.status == 200, await r.text()
        before = await cache_counts(s, nodes)
        conversations = [Conversation(key, system_prompt(t), f"user{u}")
                         for t, key in enumerate(keys) for u in range(users_per_tenant)]
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(user_loop(s, urls, c, trace, deadline, row,
                                         random.Random(rng.random())) for c in conversations))
        row.elapsed = time.perf_counter() - started
        after = await cache_counts(s, nodes)
    queried = after[0] - before[0]
    row.hit_rate = (after[1] - before[1]) / queried if queried else 0.0
    return row


async def start_gateways(count: int, strategy: str, services: dict[str, str], creds: str,
                         node_secret: str, tmp: Path) -> tuple[list[str],
                                                               list[asyncio.subprocess.Process]]:
    urls, procs = [], []
    for i in range(count):
        port = free_port()
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", env={
                **services, "NATS_CREDS": creds, "NODE_API_KEY_SECRET": node_secret,
                "HTTP_PORT": str(port), "LB_STRATEGY": strategy,
                "TENANT_REQUESTS_PER_MINUTE": str(10**9),
                "USAGE_SPOOL_DIR": str(tmp / f"spool-{strategy}-{i}")}))
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        await wait_ready(url, "/ready")
    return urls, procs


async def wait_all_routed(urls: list[str], key: str, nodes: int, timeout: float = 120
                          ) -> None:
    """Until every gateway has sent requests to every node (its /metrics counts them)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        for url in urls:
            for attempt in range(10**9):
                # Prompts that differ: prefix_aware sends one prompt to one node.
                async with s.post(f"{url}/v1/chat/completions", json={
                        "model": MODEL, "messages": [{"role": "user", "content": f"hi {attempt}"}],
                        "max_tokens": 1}, headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                async with s.get(f"{url}/metrics") as r:
                    text = await r.text()
                seen = {line.split('node="', 1)[1].split('"', 1)[0]
                        for line in text.splitlines()
                        if line.startswith("loadbalancer_requests_total{")}
                if len(seen) >= nodes:
                    break
                if attempt % 8 == 7:
                    await asyncio.sleep(0.5)  # nodes are still starting (16 processes, 2 cores)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} routes to {len(seen)} of {nodes} nodes: "
                                       + " ".join(line for line in text.splitlines()
                                                  if line.startswith("loadbalancer_")))


async def run(args: argparse.Namespace, tmp: Path) -> None:
    stack = DevStack(tmp / "servers")
    stack.start()
    assert stack.nats is not None
    procs: list[asyncio.subprocess.Process] = []
    try:
        urls = stack.urls
        pool = await prepared(stack)
        keys = await unlimited_keys(pool, [f"bench-{t}" for t in range(args.tenants)])
        env_base = {**os.environ, "LOG_LEVEL": "warning"}
        services = {**env_base, "DATABASE_URL": urls.database_url, "REDIS_URL": urls.redis_url,
                    "NATS_URL": urls.nats_url, "HTTP_HOST": "127.0.0.1"}
        procs += await start_relay_and_monitor(stack, services)
        node_secret = secrets.token_urlsafe(48)
        nodes = []
        for i in range(args.nodes):
            # KV cache events (kv_aware) on a local socket, as vLLM's --kv-events-config.
            _, sim, started = await start_node(stack, pool, node_secret, env_base, SIM,
                                               kv_events=f"ipc://{tmp}/kv-{i}.sock")
            procs += started
            nodes.append(sim)
        await pool.close()
        for node in nodes:
            await wait_ready(node)
        creds = stack.nats.creds(Role.GATEWAY)
        users = args.tenants * args.users
        print(f"routing benchmark: {args.nodes} simulated nodes ({' '.join(SIM)}), "
              f"{args.tenants} tenants x {args.users} users = {users} conversations at once, "
              f"{OUTPUT_TOKENS} output tokens a turn, {args.seconds:.0f} s a row")
        print(f"{'gw':>2} {'trace':<7} {'strategy':<13} {'ttft p50':>8} {'p90':>7} "
              f"{'p99':>7} {'out tok/s':>9} {'hit rate':>8} {'errors':>6}")
        results: dict[tuple[int, str, str], Row] = {}
        for count in args.gateways:
            for trace in args.traces:
                for strategy in args.strategies:
                    gw_urls, gw_procs = await start_gateways(count, strategy, services, creds,
                                                             node_secret, tmp)
                    try:
                        await wait_all_routed(gw_urls, keys[0], args.nodes)
                        row = await run_row(gw_urls, nodes, keys, trace, args.users,
                                            args.seconds)
                    finally:
                        await stop_processes(gw_procs)
                    results[(count, trace, strategy)] = row
                    print(f"{count:>2} {trace:<7} {strategy:<13} "
                          f"{pct(row.ttft, 50):>8.0f} {pct(row.ttft, 90):>7.0f} "
                          f"{pct(row.ttft, 99):>7.0f} {row.output_tokens / row.elapsed:>9.1f} "
                          f"{row.hit_rate:>8.2f} {row.errors:>6}", flush=True)
        print("\nratios to round_robin (TTFT p90: lower is better; tokens/s: higher)")
        for (count, trace, strategy), row in results.items():
            base = results.get((count, trace, "round_robin"))
            if base is None or strategy == "round_robin" or not base.ttft or not row.ttft:
                continue
            print(f"  {count} gateway(s) {trace:<7} {strategy:<13} TTFT p90 "
                  f"{pct(row.ttft, 90) / pct(base.ttft, 90):.2f}  tokens/s "
                  f"{(row.output_tokens / row.elapsed) / (base.output_tokens / base.elapsed):.2f}"
                  f"  hit rate {row.hit_rate:.2f} vs {base.hit_rate:.2f}")
    finally:
        await stop_processes(procs)
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--users", type=int, default=3, help="users per tenant")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--gateways", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1, 2])
    parser.add_argument("--traces", type=lambda v: v.split(","), default=["shared", "unique"])
    parser.add_argument("--strategies", type=lambda v: v.split(","), default=list(STRATEGIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
