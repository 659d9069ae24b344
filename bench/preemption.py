"""Preemption benchmark (issue 16): what clients see when nodes die under load, with the
gateway resuming requests cut by a lost node, and without.

One scenario, run twice in one invocation: resume on (the gateway's default) and resume off
(`RESUME_ATTEMPTS=0`), each on a fresh DevStack (PostgreSQL, Redis, NATS with authentication,
the outbox relay and the monitor) with fresh nodes (a simulator and a real node agent each)
and one real gateway process. Chat completions at `--concurrency` through the gateway for
`--seconds`, half streamed (with `stream_options.include_usage`), half whole answers, with
`ignore_eos`, at 40 ms a token: streams of 200-400 tokens (8-16 s), whole answers of 100-200
(4-8 s). So the failures below land mid-answer, and streams on B when its notice comes are
still running when the gateway moves them (`RESUME_CUTOVER_SECONDS`: 5 s before the
deadline, 5 s after the notice). During the run, with N nodes (default 4):

  at 1/4 of the run    node A's machine dies: its simulator and agent get SIGKILL;
  at 1/3               node B gets a spot notice (a `NodeSpotWarning`, provider aws, action
                       terminate, deadline 10 s later, published on NATS as its agent would);
                       at the deadline its machine dies (SIGKILL);
  at 1/2               node C's machine dies.

The load goes on against whoever is left (with 4 nodes, one survivor from 1/3 + 10 s on).
With 30 s, B's streams move at 15 s, as C dies: some land on C and must move again.

Client side, per request: errors it saw (a non-200 status, an SSE `error` event, a broken
connection), streams that ended without a `finish_reason` or without `[DONE]`, the completion
tokens it received (a stream's final usage chunk, else its content chunks; a whole answer's
`usage`) and its latency. The usage events the gateway published (`usage.recorded.>`, read on
NATS from the start, matched by request id: the client sends `X-Request-ID`) give the tokens
billed and whether the request was resumed (`resumed`); the gateway's /metrics gives
`gateway_resumed_requests_total{reason}` and `gateway_resume_tokens_total`. Printed side by
side: errors, incomplete streams, resumed requests, the extra latency of a resumed request,
tokens billed against tokens received (the goal: equal); then the failed and mis-billed
requests one by one. The extra latency compares each request's overhead (its latency less its
own nominal time, TTFT + max_tokens x ITL: lengths differ) among the requests that completed:
p50 (p99) of the resumed ones' less p50 (p99) of the others'.

`python bench/preemption.py [--seconds 30] [--concurrency 16] [--nodes 4]`. Run by hand: the
figures depend on the machine and on where the kills land. The gateways' logs (LOG_LEVEL
info) are kept in `--logs` (a new temporary folder unless given) for reading afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import NodeSpotWarning, UsageRecorded, decode_event
from services.infra.bus import Bus
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

SPOT_NOTICE_SECONDS = 10.0
"""From the spot notice to the machine going (AWS gives two minutes; scaled down)."""
CUTOVER_SECONDS = 5.0
"""The gateway's RESUME_CUTOVER_SECONDS (its default): streams leave B this long before."""
STREAM_TOKENS = (200, 400)
WHOLE_TOKENS = (100, 200)


@dataclass
class Node:
    label: str
    node_id: uuid.UUID
    url: str
    sim: asyncio.subprocess.Process
    agent: asyncio.subprocess.Process

    def kill(self) -> None:
        """The machine dies: nothing of it says goodbye."""
        for p in (self.sim, self.agent):
            if p.returncode is None:
                p.kill()


@dataclass
class Call:
    """One request, as the client saw it."""

    request_id: str
    stream: bool
    max_tokens: int
    started: float
    """Seconds from the start of the load."""
    latency: float = 0.0
    status: int = 0
    error: str = ""
    """What the client saw go wrong (empty: nothing)."""
    finish_reason: str | None = None
    done: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    """From the answer's usage (a stream's final usage chunk)."""
    content_chunks: int = 0
    header_id: str = ""

    @property
    def incomplete(self) -> bool:
        return self.stream and (self.finish_reason is None or not self.done)

    @property
    def received(self) -> int:
        """Completion tokens the client got: its usage, else (a cut stream) its chunks (one
        token each: the simulator's, with ignore_eos, sends no empty EOS chunk)."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return self.content_chunks if self.stream else 0


@dataclass
class Run:
    mode: str
    calls: list[Call] = field(default_factory=list)
    usage: dict[str, list[UsageRecorded]] = field(default_factory=dict)
    """Usage events by request id (deduplicated by event id)."""
    resumed_by_reason: dict[str, float] = field(default_factory=dict)
    resume_tokens: float = 0.0
    lb_errors: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    """Node id -> label (A killed, B spot notice, C killed, D... survivors)."""
    timeline: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    log: Path | None = None
    spot_at: float | None = None
    """When B got its spot notice (seconds from the start of the load)."""


_decode_chunk = msgspec.json.Decoder(dict[str, Any]).decode


async def call(s: aiohttp.ClientSession, url: str, key: str, rng: random.Random, stream: bool,
               t0: float) -> Call:
    c = Call(f"pre-{uuid.uuid4().hex}", stream,
             rng.randint(*(STREAM_TOKENS if stream else WHOLE_TOKENS)),
             time.perf_counter() - t0)
    words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(40))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": c.max_tokens, "ignore_eos": True,
                            "messages": [{"role": "user", "content": f"Tell a story: {words}"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    try:
        async with s.post(f"{url}/v1/chat/completions", json=body, headers={
                "Authorization": f"Bearer {key}", "X-Request-ID": c.request_id}) as r:
            c.status = r.status
            c.header_id = r.headers.get("X-Request-ID", "")
            if r.status != 200:
                c.error = f"HTTP {r.status}: {(await r.read())[:200].decode(errors='replace')}"
            elif not stream:
                answer = _decode_chunk(await r.read())
                usage = answer.get("usage") or {}
                c.prompt_tokens = usage.get("prompt_tokens")
                c.completion_tokens = usage.get("completion_tokens")
                choices = answer.get("choices") or [{}]
                c.finish_reason = choices[0].get("finish_reason")
            else:
                await read_stream(r, c)
    except (aiohttp.ClientError, TimeoutError) as exc:
        c.error = c.error or f"client: {exc!r}"[:200]
    c.latency = time.perf_counter() - started
    return c


async def read_stream(r: aiohttp.ClientResponse, c: Call) -> None:
    async for line in r.content:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            c.done = True
            continue
        try:
            chunk = _decode_chunk(payload)
        except msgspec.DecodeError:
            c.error = c.error or f"undecodable chunk: {payload[:100]!r}"
            continue
        if "error" in chunk:
            c.error = c.error or f"SSE error: {msgspec.json.encode(chunk['error'])[:200]!r}"
            continue
        usage = chunk.get("usage")
        choices = chunk.get("choices") or []
        if isinstance(usage, dict) and not choices:
            c.prompt_tokens = usage.get("prompt_tokens")
            c.completion_tokens = usage.get("completion_tokens")
        for choice in choices:
            if (choice.get("delta") or {}).get("content"):
                c.content_chunks += 1
            if choice.get("finish_reason"):
                if c.finish_reason is not None:
                    c.error = c.error or "two finish_reasons in one stream"
                c.finish_reason = choice["finish_reason"]


async def load(url: str, key: str, concurrency: int, seconds: float, t0: float,
               calls: list[Call]) -> None:
    timeout = aiohttp.ClientTimeout(total=300)

    async def worker(i: int, s: aiohttp.ClientSession) -> None:
        rng = random.Random(i)
        n = i
        while time.perf_counter() - t0 < seconds:
            calls.append(await call(s, url, key, rng, n % 2 == 0, t0))
            n += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as s:
        await asyncio.gather(*(worker(i, s) for i in range(concurrency)))


async def chaos(bus: Bus, nodes: list[Node], seconds: float, t0: float, run: Run) -> None:
    """Kill A at 1/4, a spot notice to B at 1/3 (gone at its deadline), kill C at 1/2."""
    a, b, c = nodes[0], nodes[1], nodes[2]

    def say(what: str) -> None:
        run.timeline.append(f"{time.perf_counter() - t0:6.1f} s  {what}")

    async def spot() -> None:
        deadline = datetime.now(UTC) + timedelta(seconds=SPOT_NOTICE_SECONDS)
        run.spot_at = time.perf_counter() - t0
        await bus.publish(NodeSpotWarning(node_id=b.node_id, provider="aws",
                                          action="terminate", deadline=deadline))
        say(f"node B ({b.node_id}): spot notice, deadline in {SPOT_NOTICE_SECONDS:.0f} s")

    async def kill(node: Node, why: str) -> None:
        node.kill()
        say(f"node {node.label} ({node.node_id}): SIGKILL (simulator and agent){why}")

    actions: list[tuple[float, Callable[[], Awaitable[None]]]] = [
        (seconds / 4, lambda: kill(a, "")),
        (seconds / 3, spot),
        (seconds / 2, lambda: kill(c, "")),
        (seconds / 3 + SPOT_NOTICE_SECONDS, lambda: kill(b, ": its spot deadline")),
    ]
    for at, action in sorted(actions, key=lambda x: x[0]):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        await action()


async def scrape(url: str, run: Run) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_resumed_requests_total":
                run.resumed_by_reason[sample.labels["reason"]] = sample.value
            elif sample.name == "gateway_resume_tokens_total":
                run.resume_tokens = sample.value
            elif sample.name == "loadbalancer_errors_total":
                label = run.nodes.get(sample.labels["node"], sample.labels["node"][:8])
                reason = f"{label}:{sample.labels['reason']}"
                run.lb_errors[reason] = run.lb_errors.get(reason, 0) + sample.value


async def wait_routed_to_all(url: str, key: str, nodes: int, timeout: float = 120) -> None:
    """Until the gateway has sent requests to every node (its /metrics counts them)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        for attempt in range(10**9):
            async with s.post(f"{url}/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": f"hi {attempt}"}],
                    "max_tokens": 1}, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
            seen = {line.split('node="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                    if line.startswith("loadbalancer_requests_total{")}
            if len(seen) >= nodes:
                return
            if attempt % 8 == 7:
                await asyncio.sleep(0.5)  # nodes still starting
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway routes to {len(seen)} of {nodes} nodes")


async def scenario(args: argparse.Namespace, mode: str, tmp: Path, logs: Path) -> Run:
    run = Run(mode, log=logs / f"gateway-resume-{mode}.log")
    stack = DevStack(tmp / f"servers-{mode}")
    stack.start()
    assert stack.nats is not None
    procs: list[asyncio.subprocess.Process] = []
    bus: Bus | None = None
    log_file = run.log.open("wb") if run.log else None
    try:
        urls = stack.urls
        pool = await prepared(stack)
        [key] = await unlimited_keys(pool, ["bench-preemption"])
        env_base = {**os.environ, "LOG_LEVEL": "warning"}
        services = {**env_base, "DATABASE_URL": urls.database_url, "REDIS_URL": urls.redis_url,
                    "NATS_URL": urls.nats_url, "HTTP_HOST": "127.0.0.1"}
        procs += await start_relay_and_monitor(stack, services)
        node_secret = secrets.token_urlsafe(48)
        nodes: list[Node] = []
        for i in range(args.nodes):
            node_id, url, (sim, agent) = await start_node(
                stack, pool, node_secret, env_base,
                ["--ttft", str(args.ttft), "--itl", str(args.itl)])
            procs += [sim, agent]
            nodes.append(Node(chr(ord("A") + i), node_id, url, sim, agent))
            run.nodes[str(node_id)] = chr(ord("A") + i)
        await pool.close()
        for node in nodes:
            await wait_ready(node.url)

        bus = await Bus.connect(urls.nats_url, name="bench-preemption",
                                creds=stack.nats.creds(Role.ADMIN))
        seen_events: set[uuid.UUID] = set()

        async def on_usage(msg: Msg) -> None:
            event = decode_event(msg.data)
            if isinstance(event, UsageRecorded) and event.id not in seen_events:
                seen_events.add(event.id)
                run.usage.setdefault(event.request_id, []).append(event)

        await bus.nc.subscribe("usage.recorded.>", cb=on_usage)

        gw_port = free_port()
        gw_url = f"http://127.0.0.1:{gw_port}"
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", stdout=log_file, stderr=log_file, env={
                **services, "LOG_LEVEL": "info", "NATS_CREDS": stack.nats.creds(Role.GATEWAY),
                "NODE_API_KEY_SECRET": node_secret, "HTTP_PORT": str(gw_port),
                "TENANT_REQUESTS_PER_MINUTE": str(10**9),
                "USAGE_SPOOL_DIR": str(tmp / f"spool-{mode}"),
                **({"RESUME_ATTEMPTS": "0"} if mode == "off" else {})}))
        await wait_ready(gw_url, "/ready")
        await wait_routed_to_all(gw_url, key, args.nodes)

        t0 = time.perf_counter()
        await asyncio.gather(load(gw_url, key, args.concurrency, args.seconds, t0, run.calls),
                             chaos(bus, nodes, args.seconds, t0, run))
        run.elapsed = time.perf_counter() - t0
        await scrape(gw_url, run)
        # Every request's usage event (the gateway publishes off the response's path).
        wanted = {c.request_id for c in run.calls}
        for _ in range(100):  # 20 s at most
            if wanted <= run.usage.keys():
                break
            await asyncio.sleep(0.2)
    finally:
        if bus is not None:
            await bus.close()
        await stop_processes(procs)
        if log_file is not None:
            log_file.close()
        stack.stop()
    return run


# --------------------------------------------------------------------------- the figures


@dataclass
class Figures:
    requests: str
    errors: int
    incomplete: int
    resumed: int
    resumes: int
    by_reason: str
    resume_tokens: float
    resumed_p50: float
    resumed_p99: float
    plain_p50: float
    plain_p99: float
    extra_p50: float
    extra_p99: float
    billed_completion: int
    received_completion: int
    billed_total: int
    received_total: int
    chunk_mismatch: int
    missing: int
    duplicated: int
    id_mismatch: int
    mis_billed: list[tuple[Call, list[UsageRecorded]]]


def figures(run: Run, ttft: float, itl: float) -> Figures:
    calls = run.calls
    resumed = {rid for rid, events in run.usage.items() if any(e.resumed for e in events)}
    ok = [c for c in calls if not c.error and not c.incomplete]
    resumed_lat = [c.latency for c in ok if c.request_id in resumed]
    plain_lat = [c.latency for c in ok if c.request_id not in resumed]
    resumed_over = [c.latency - ttft - c.max_tokens * itl for c in ok if c.request_id in resumed]
    plain_over = [c.latency - ttft - c.max_tokens * itl for c in ok
                  if c.request_id not in resumed]
    billed_completion = billed_total = received_completion = received_total = 0
    mis_billed: list[tuple[Call, list[UsageRecorded]]] = []
    for c in calls:
        events = run.usage.get(c.request_id, [])
        bc = sum(e.completion_tokens for e in events)
        bp = sum(e.prompt_tokens for e in events)
        billed_completion += bc
        billed_total += bc + bp
        received_completion += c.received
        # A client that got no usage knows no prompt count: the bill's is taken as its own.
        received_total += c.received + (c.prompt_tokens if c.prompt_tokens is not None else bp)
        if bc != c.received or (c.prompt_tokens is not None and bp != c.prompt_tokens):
            mis_billed.append((c, events))
    return Figures(
        requests=f"{sum(c.stream for c in calls)}/{sum(not c.stream for c in calls)}",
        errors=sum(bool(c.error) for c in calls),
        incomplete=sum(c.incomplete for c in calls),
        resumed=len(resumed & {c.request_id for c in calls}),
        resumes=sum(e.resumed for c in calls for e in run.usage.get(c.request_id, [])),
        by_reason=" ".join(f"{k}={v:.0f}" for k, v in sorted(run.resumed_by_reason.items())
                           ) or "-",
        resume_tokens=run.resume_tokens,
        resumed_p50=pct(resumed_lat, 50), resumed_p99=pct(resumed_lat, 99),
        plain_p50=pct(plain_lat, 50), plain_p99=pct(plain_lat, 99),
        extra_p50=pct(resumed_over, 50) - pct(plain_over, 50),
        extra_p99=pct(resumed_over, 99) - pct(plain_over, 99),
        billed_completion=billed_completion, received_completion=received_completion,
        billed_total=billed_total, received_total=received_total,
        chunk_mismatch=sum(c.stream and c.completion_tokens is not None
                           and c.completion_tokens != c.content_chunks for c in calls),
        missing=sum(c.request_id not in run.usage for c in calls),
        duplicated=sum(len(run.usage.get(c.request_id, [])) > 1 for c in calls),
        id_mismatch=sum(bool(c.header_id) and c.header_id != c.request_id for c in calls),
        mis_billed=mis_billed)


def report(runs: list[Run], ttft: float, itl: float) -> None:
    fs = [figures(r, ttft, itl) for r in runs]
    width = 22
    head = "".join(f"{'resume ' + r.mode:>{width}}" for r in runs)
    print(f"\n{'':<44}{head}")

    def row(title: str, values: list[str]) -> None:
        print(f"{title:<44}" + "".join(f"{v:>{width}}" for v in values))

    row("requests (streamed/whole)", [f.requests for f in fs])
    row("client-visible errors", [str(f.errors) for f in fs])
    row("incomplete streams (no finish or [DONE])", [str(f.incomplete) for f in fs])
    row("resumed requests (usage events)", [str(f.resumed) for f in fs])
    row("resumes (sum of usage `resumed`)", [str(f.resumes) for f in fs])
    row("gateway_resumed_requests_total", [f.by_reason for f in fs])
    row("gateway_resume_tokens_total", [f"{f.resume_tokens:.0f}" for f in fs])
    row("latency p50 ms resumed / not", [f"{f.resumed_p50:.0f} / {f.plain_p50:.0f}"
                                        for f in fs])
    row("latency p99 ms resumed / not", [f"{f.resumed_p99:.0f} / {f.plain_p99:.0f}"
                                        for f in fs])
    row("extra latency of a resumed req p50 ms", [f"{f.extra_p50:+.0f}" for f in fs])
    row("extra latency of a resumed req p99 ms", [f"{f.extra_p99:+.0f}" for f in fs])
    row("completion tokens billed / received",
        [f"{f.billed_completion} / {f.received_completion}" for f in fs])
    row("prompt+completion billed / received",
        [f"{f.billed_total} / {f.received_total}" for f in fs])
    row("requests billed otherwise than received", [str(len(f.mis_billed)) for f in fs])
    row("usage events missing / duplicated", [f"{f.missing} / {f.duplicated}" for f in fs])
    row("streams: usage != content chunks", [str(f.chunk_mismatch) for f in fs])
    row("X-Request-ID not echoed as sent", [str(f.id_mismatch) for f in fs])
    row("node errors (loadbalancer_errors_total)",
        [str(int(sum(r.lb_errors.values()))) for r in runs])
    for run, f in zip(runs, fs, strict=True):
        print(f"\nresume {run.mode}: {run.elapsed:.1f} s; gateway log {run.log}")
        for line in run.timeline:
            print(f"  {line}")
        print("  node errors: " + (" ".join(f"{k}={v:.0f}" for k, v in
                                           sorted(run.lb_errors.items())) or "-"))
        ends: dict[str, list[float]] = collections.defaultdict(list)
        for c in run.calls:
            for e in run.usage.get(c.request_id, []):
                ends[run.nodes.get(str(e.node_id), "?")].append(c.started + c.latency)
        print("  requests by the node that ended them (last end): " + " ".join(
            f"{label}={len(t)} ({max(t):.1f} s)" for label, t in sorted(ends.items())))
        if run.spot_at is not None:
            cutover = run.spot_at + SPOT_NOTICE_SECONDS - CUTOVER_SECONDS
            late = [c for c in run.calls if c.started + c.latency > cutover
                    and any(run.nodes.get(str(e.node_id)) == "B"
                            for e in run.usage.get(c.request_id, []))]
            print(f"  B's cutover at {cutover:.1f} s: requests ending on B after it: "
                  f"{sum(c.stream for c in late)} streams, {sum(not c.stream for c in late)} "
                  "whole")
            for c in late[:4]:
                print("    " + describe(run, c))
        kinds = collections.Counter(c.error[:110] for c in run.calls if c.error)
        for error, count in kinds.most_common(6):
            print(f"  {count:>4} x {error}")
        bad = [c for c in run.calls if c.error or c.incomplete]
        bad_ids = {c.request_id for c in bad}
        for c in sorted(bad, key=lambda c: c.started)[:12]:
            print("  failed " + describe(run, c))
        if len(bad) > 12:
            print(f"  ... {len(bad) - 12} more failed or incomplete")
        mis = [(c, e) for c, e in f.mis_billed if c.request_id not in bad_ids]
        for c, _ in sorted(mis, key=lambda m: m[0].started)[:8]:
            print("  mis-billed " + describe(run, c))


def describe(run: Run, c: Call) -> str:
    events = run.usage.get(c.request_id, [])
    billed = ", ".join(f"{e.prompt_tokens}+{e.completion_tokens} status {e.status} resumed "
                       f"{e.resumed} on {run.nodes.get(str(e.node_id), e.node_id)}"
                       for e in events) or "no usage event"
    received = (f"{c.prompt_tokens}+{c.completion_tokens}" if c.completion_tokens is not None
                else f"{c.content_chunks} chunks, no usage")
    return (f"{c.request_id} {'stream' if c.stream else 'whole'} max {c.max_tokens} "
            f"{c.started:.1f}-{c.started + c.latency:.1f} s: "
            f"{c.error or 'no error'}; finish {c.finish_reason} [DONE] {c.done}; "
            f"received {received}; billed {billed}")


async def main_async(args: argparse.Namespace, tmp: Path, logs: Path) -> None:
    print(f"preemption benchmark: {args.nodes} simulated nodes (--ttft {args.ttft} --itl "
          f"{args.itl}), chat at concurrency {args.concurrency} for {args.seconds:.0f} s, "
          f"half streamed ({STREAM_TOKENS[0]}-{STREAM_TOKENS[1]} tokens; whole answers "
          f"{WHOLE_TOKENS[0]}-{WHOLE_TOKENS[1]}; ignore_eos); node A killed at "
          f"1/4, B a spot notice at 1/3 (killed {SPOT_NOTICE_SECONDS:.0f} s later), C killed "
          "at 1/2", flush=True)
    runs = []
    for mode in args.modes:
        runs.append(await scenario(args, mode, tmp, logs))
        print(f"resume {mode}: {len(runs[-1].calls)} requests", flush=True)
    report(runs, args.ttft, args.itl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=4, help="at least 4 (3 fail)")
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--itl", type=float, default=0.04)
    parser.add_argument("--modes", type=lambda v: v.split(","), default=["on", "off"],
                        help="resume on, off, or both (on,off)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for the gateways' logs (default: a new temporary one)")
    args = parser.parse_args()
    if args.nodes < 4:
        parser.error("--nodes: at least 4 (three of them fail)")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="preemption-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main_async(args, Path(tmp), logs))


if __name__ == "__main__":
    main()
