"""The gateway when things go wrong: limits across processes, dead gateways, failing nodes,
clients that hang up, NATS and Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import NodeTerminated, Quota, UsageRecorded, decode_event
from services.domain.fleet.projection import NodesProjection
from services.infra.devstack import free_port
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import Role
from services.infra.projections import ProjectionRunner
from tests.helpers import children_of, eventually, node_registered, process_alive
from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


async def usage(p: Platform) -> list[UsageRecorded]:
    info = await p.bus.js.stream_info("USAGE")
    if info.state.messages == 0:
        return []
    return [decode_event((await p.bus.js.get_msg("USAGE", seq)).data or b"")  # type: ignore[misc]
            for seq in range(info.state.first_seq, info.state.last_seq + 1)]


async def chat(session: aiohttp.ClientSession, url: str, key: str, **body: Any
               ) -> tuple[int, dict[str, str]]:
    payload = {"model": MODEL, "messages": HELLO, "max_tokens": 2, **body}
    async with session.post(f"{url}/v1/chat/completions", json=payload,
                            headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status, dict(r.headers)


# --------------------------------------------------------------------------- limits


async def start_gateway_process(p: Platform, port: int, **env: str
                                ) -> asyncio.subprocess.Process:
    settings = {"DATABASE_URL": p.servers.database_url, "REDIS_URL": p.servers.redis_url,
                "NATS_URL": p.servers.nats_url, "NATS_CREDS": p.servers.creds(Role.GATEWAY),
                "NODE_API_KEY_SECRET": p.node_key_secret, "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(port), "LOG_LEVEL": "warning",
                "USAGE_SPOOL_DIR": str(p.tmp / f"spool-{port}"), **env}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "services.gateway",
                                                env={**os.environ, **settings})


async def serving(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/ready") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_limits_are_exact_across_two_gateway_processes(platform: Platform) -> None:  # noqa: F811
    p = platform
    limited = await p.catalog.create_api_key(p.environment_id,
                                             limits=Quota(requests_per_minute=30))
    await p.add_node()
    ports = [free_port(), free_port()]
    procs = [await start_gateway_process(p, port) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: _all(serving(s, u) for u in urls), timeout=30,
                             what="both gateways ready")
            # Both must see the node before the test, or refusals would be 503s.
            ok = await eventually(lambda: _both_route(s, urls, p.key.plaintext), timeout=15,
                                  what="both gateways route")
            assert ok
            results = await asyncio.gather(*(chat(s, urls[i % 2], limited.plaintext)
                                             for i in range(50)))
        statuses = Counter(status for status, _ in results)
        assert statuses == {200: 30, 429: 20}
        refused = next(h for status, h in results if status == 429)
        assert refused["x-ratelimit-scope"] == "key_requests"
        assert int(refused["Retry-After"]) >= 1
        assert refused["x-ratelimit-limit-requests"] == "30"
        assert refused["x-ratelimit-remaining-requests"] == "0"
    finally:
        for proc in procs:
            proc.terminate()
        await asyncio.gather(*(proc.wait() for proc in procs))


async def _all(checks: Any) -> bool:
    return all([await c for c in checks])


async def _both_route(s: aiohttp.ClientSession, urls: list[str], key: str) -> bool:
    return all([(await chat(s, u, key))[0] == 200 for u in urls])


async def test_concurrency_lease_of_a_killed_gateway_is_reclaimed(platform: Platform  # noqa: F811
                                                                  ) -> None:
    p = platform
    single = await p.catalog.create_api_key(p.environment_id, limits=Quota(concurrency=1))
    await p.add_node(inter_token_latency=0.05)
    port = free_port()
    proc = await start_gateway_process(p, port, CONCURRENCY_LEASE_SECONDS="2")
    url = f"http://127.0.0.1:{port}"
    await p.start_gateway()  # a second gateway, in-process, sharing Redis
    await p.routable(1)
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: serving(s, url), timeout=30, what="gateway ready")
            await eventually(lambda: _routes(s, url, p.key.plaintext), timeout=15,
                             what="gateway routes")
            # A long stream holds the key's only slot on the doomed gateway...
            holder = asyncio.create_task(chat(s, url, single.plaintext, max_tokens=1000,
                                              stream=True))

            async def slot_taken() -> bool:
                status, _ = await chat(s, p.gateway_url, single.plaintext)
                return status == 429

            await eventually(slot_taken, timeout=30, what="the slot is held")
            proc.send_signal(signal.SIGKILL)  # ...which dies without releasing it
            await proc.wait()
            await asyncio.gather(holder, return_exceptions=True)

            async def slot_free() -> bool:
                status, _ = await chat(s, p.gateway_url, single.plaintext)
                return status == 200

            await eventually(slot_free, timeout=30, what="the lease expires")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _routes(s: aiohttp.ClientSession, url: str, key: str) -> bool:
    return (await chat(s, url, key))[0] == 200


# --------------------------------------------------------------------------- nodes


async def test_circuit_breaker_moves_traffic_off_a_failing_node(platform: Platform  # noqa: F811
                                                                ) -> None:
    p = platform
    # Not sent again elsewhere (resume_attempts=0): what the client sees is the node's.
    await p.start_gateway(circuit_min_requests=4, circuit_cooldown_seconds=60,
                          resume_attempts=0)
    bad = await p.add_node()
    good = await p.add_node()
    await p.routable(2)
    await bad.faults(error_rate=1.0)
    client = p.client()
    outcomes = []
    for _ in range(30):
        try:
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
            outcomes.append("ok")
        except openai.APIStatusError as exc:
            outcomes.append(exc.status_code)
    await client.close()
    # Round robin sends every other request to the bad node until its circuit opens
    # (4 outcomes, all errors); from then on everything goes to the good one.
    assert outcomes.count(502) == 4
    assert outcomes[-20:] == ["ok"] * 20
    state = p.gw.balancer.breaker.state(bad.node_id, asyncio.get_running_loop().time())
    assert state == "open"
    assert p.gw.balancer.breaker.state(good.node_id, 0) == "closed"


async def test_one_retry_on_another_node_when_the_connection_fails(platform: Platform  # noqa: F811
                                                                   ) -> None:
    p = platform
    await p.start_gateway()
    # Healthy by its heartbeats, but its advertised address refuses connections.
    dead = await p.add_node(advertise=f"http://127.0.0.1:{free_port()}")
    good = await p.add_node()
    await p.routable(2)
    client = p.client()
    for _ in range(6):
        r = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        assert r.choices[0].finish_reason
    await client.close()
    m = await _metrics(p)
    retries = m[("gateway_upstream_retries_total", ())]
    assert retries >= 1  # round robin sent some requests to the dead node first...
    assert m[("loadbalancer_errors_total", (("model", MODEL), ("node", dead.node_id),
                                            ("reason", "connect")))] == retries
    # ...and every one of them was answered by the good node.
    assert m[("loadbalancer_requests_total", (("model", MODEL), ("node", good.node_id)))] == 6


async def test_all_circuits_open_is_503_without_spending_quota(platform: Platform  # noqa: F811
                                                               ) -> None:
    p = platform
    limited = await p.catalog.create_api_key(p.environment_id,
                                             limits=Quota(requests_per_minute=6))
    await p.start_gateway(circuit_min_requests=4, circuit_cooldown_seconds=60)
    only = await p.add_node()
    await p.routable(1)
    await only.faults(error_rate=1.0)
    client = p.client(limited.plaintext)
    statuses = []
    for _ in range(9):
        try:
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
            statuses.append(200)
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
    await client.close()
    # Four failures open the only circuit (and spend four of six); nobody can serve now, so
    # the rest are 503 and the two requests left in the minute are still there.
    assert statuses == [502] * 4 + [503] * 5


async def test_a_node_that_leaves_takes_its_series_and_circuit_along(platform: Platform  # noqa: F811
                                                                     ) -> None:
    p = platform
    await p.start_gateway()
    node = await p.add_node()
    await p.routable(1)
    r = await p.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert r.choices
    before = await _metrics(p)
    assert any(dict(labels).get("node") == node.node_id for _, labels in before)
    await p.bus.publish(NodeTerminated(node_id=uuid.UUID(node.node_id), reason="test"))

    async def gone() -> bool:
        return node.node_id not in p.gw.table.nodes

    await eventually(gone, what="the node leaves the table")
    after = await _metrics(p)
    assert not any(dict(labels).get("node") == node.node_id for _, labels in after)
    assert node.node_id not in p.gw.balancer.latency


async def test_a_node_older_than_the_stream_is_known_from_the_projection(
        platform: Platform) -> None:  # noqa: F811
    """NATS keeps a registration for the NODES stream's age; the `nodes` projection keeps it
    for as long as the node lives. A gateway started later still routes to such a node."""
    p = platform
    node = await p.add_node()

    async def stored() -> bool:
        return bool((await p.bus.js.stream_info("NODES")).state.messages)

    await eventually(stored, what="the registration in NATS")
    registered = msgspec.structs.replace(node_registered(uuid.UUID(node.node_id), model=MODEL),
                                         endpoint_url=node.url)
    log = EventLog(p.pool)
    await log.record([registered])
    await ProjectionRunner(log, NodesProjection()).catch_up()
    await p.bus.js.purge_stream("NODES")  # as if it had aged out
    await p.start_gateway()
    await p.routable(1)
    r = await p.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert r.choices


async def test_a_client_gone_before_the_first_byte_is_settled_and_frees_the_node(
        platform: Platform) -> None:  # noqa: F811
    """The client hangs up while the node is still silent; the node then answers. Nothing
    was delivered: the request is recorded (499, no tokens) and the node's slot is free."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        arrived.set()
        await release.wait()
        with contextlib.suppress(ConnectionError):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow_node, "127.0.0.1", 0)
    p = platform
    await p.start_gateway()
    node = await p.add_node(advertise=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    await p.routable(1)
    session = aiohttp.ClientSession()
    call = asyncio.create_task(chat(session, p.gateway_url, p.key.plaintext, stream=True))
    await asyncio.wait_for(arrived.wait(), 10)
    call.cancel()
    await session.close()
    assert p.gateway_runner is not None and p.gateway_runner.server is not None
    connections = p.gateway_runner.server.connections

    async def hung_up() -> bool:
        # A connection stays listed until its handler ends; its transport goes at once.
        return all(handler.transport is None for handler in connections)

    await eventually(hung_up, what="the gateway sees the client gone")
    release.set()

    async def recorded() -> bool:
        return any(e.status == 499 for e in await usage(p))

    await eventually(recorded, what="the request recorded")
    [event] = await usage(p)
    assert (event.prompt_tokens, event.completion_tokens) == (0, 0)
    assert str(event.node_id) == node.node_id
    assert p.gw.balancer.in_flight.get(node.node_id) is None
    server.close()


async def _metrics(p: Platform) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gateway's /metrics as {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as s, s.get(f"{p.gateway_url}/metrics") as r:
        text = await r.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_no_node_for_the_model_is_503(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway()
    with pytest.raises(openai.InternalServerError) as info:
        await p.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert info.value.status_code == 503
    assert "No node is serving" in str(info.value)
    assert await usage(p) == []


# --------------------------------------------------------------------------- clients


async def test_client_disconnect_mid_stream_bills_what_was_delivered(platform: Platform  # noqa: F811
                                                                     ) -> None:
    p = platform
    await p.start_gateway()
    node = await p.add_node(inter_token_latency=0.02)
    await p.routable(1)
    received = 0
    async with aiohttp.ClientSession() as s, s.post(f"{p.gateway_url}/v1/chat/completions",
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 200,
                            "stream": True},
                      headers={"Authorization": f"Bearer {p.key.plaintext}"}) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content":"' in line \
                        and b'"content":""' not in line:  # not the role chunk
                received += 1
            if received == 10:
                break  # hang up after ten tokens
    (event,) = await eventually(lambda: usage(p), what="usage of the aborted stream")
    assert event.status == 499 and event.streamed
    # Billed what the gateway had sent: at least what we read, far less than 200.
    assert 10 <= event.completion_tokens < 60
    assert event.prompt_tokens > 0

    async def upstream_cancelled() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{node.url}/metrics") as r:
            text = await r.text()
        return f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0' in text

    await eventually(upstream_cancelled, what="vLLM stopped generating")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_cut_off_by_the_deadline_settles_and_is_billed(
        platform: Platform, stream: bool) -> None:  # noqa: F811
    p = platform
    single = await p.catalog.create_api_key(p.environment_id, limits=Quota(concurrency=1))
    await p.start_gateway(request_timeout=1.0, stream_chunk_timeout=1.0)
    # Whole answers take 200 x 50 ms; streams stop after five tokens and hang.
    node = await p.add_node(inter_token_latency=0.05)
    await p.routable(1)
    if stream:
        await node.faults(hang_after_tokens=5)
    async with aiohttp.ClientSession() as s:
        payload = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stream": stream}
        async with s.post(f"{p.gateway_url}/v1/chat/completions", json=payload,
                          headers={"Authorization": f"Bearer {single.plaintext}"}) as r:
            body = await r.read()
        if stream:
            assert r.status == 200 and b'"type":"timeout' in body.replace(b" ", b"")
        else:
            assert r.status == 504, body
        (event,) = await eventually(lambda: usage(p), what="usage of the cut-off request")
        assert event.status == 504 and event.node_id is not None
        assert event.completion_tokens == (5 if stream else 0)
        await node.faults(hang_after_tokens=None)
        # Its concurrency slot was given back at once, not when the lease ran out (120 s).
        assert (await chat(s, p.gateway_url, single.plaintext))[0] == 200
    assert p.gw.balancer.in_flight == {}


# --------------------------------------------------------------------------- outages


async def test_workers_die_with_a_supervisor_killed_hard(platform: Platform  # noqa: F811
                                                         ) -> None:
    """Left behind, they would go on taking connections on the port beside the next
    supervisor's workers."""
    p = platform
    port = free_port()
    proc = await start_gateway_process(p, port, WORKERS="2")
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: serving(s, f"http://127.0.0.1:{port}"), timeout=30,
                             what="workers ready")

        async def both() -> bool:
            return len(children_of(proc.pid)) == 2

        await eventually(both, what="two workers")
        workers = children_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

        async def gone() -> bool:
            return not any(process_alive(pid) for pid in workers)

        await eventually(gone, what="the workers gone too")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_revocation_reaches_every_gateway_within_a_second(platform: Platform  # noqa: F811
                                                                  ) -> None:
    p = platform
    await p.start_gateway()
    port = free_port()
    proc = await start_gateway_process(p, port)
    other = f"http://127.0.0.1:{port}"
    doomed = await p.catalog.create_api_key(p.environment_id)
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: serving(s, other), timeout=30, what="second gateway")

            async def status(url: str) -> int:
                async with s.get(f"{url}/v1/models",
                                 headers={"Authorization": f"Bearer {doomed.plaintext}"}) as r:
                    return r.status

            # Both have the key cached now.
            assert [await status(p.gateway_url), await status(other)] == [200, 200]
            await p.catalog.revoke_api_key(doomed.key_id)
            revoked_at = time.monotonic()

            async def refused_everywhere() -> bool:
                return [await status(p.gateway_url), await status(other)] == [401, 401]

            await eventually(refused_everywhere, timeout=1, what="revoked on both gateways")
            assert time.monotonic() - revoked_at < 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


class CuttableLink:
    """A TCP relay between a client and NATS that can be cut and mended: one gateway losing
    NATS while the rest of the platform keeps it (a partition, not a restart)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = True
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for w in self.writers:
            w.close()
        self.writers.clear()

    def mend(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_a_revocation_published_while_a_gateway_was_cut_off_still_reaches_it(
        platform: Platform) -> None:  # noqa: F811
    p = platform
    link = CuttableLink(int(p.servers.nats_url.rsplit(":", 1)[1]))
    port = await link.start()
    from services.infra.settings import Secret

    # A long local cache: only the revocation event can take the key out in time.
    await p.start_gateway(nats_url=Secret(f"nats://127.0.0.1:{port}"),
                          auth_local_cache_seconds=120)
    doomed = await p.catalog.create_api_key(p.environment_id)
    client = p.client(doomed.plaintext)
    await client.models.list()  # cached
    link.cut()
    await eventually(lambda: _disconnected(p), what="the gateway loses NATS")
    await p.catalog.revoke_api_key(doomed.key_id)  # the relay publishes it; this one misses it

    async def in_stream() -> bool:
        return bool((await p.bus.js.stream_info("CONTROL")).state.messages)

    await eventually(in_stream, what="the revocation published")
    link.mend()

    async def refused() -> bool:
        try:
            await client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    await eventually(refused, timeout=15, what="the missed revocation applied")
    await client.close()
    link.close()


async def test_usage_survives_a_nats_restart(platform: Platform) -> None:  # noqa: F811
    p = platform
    if p.servers.nats is None:
        pytest.skip("needs the embedded NATS server to restart it")
    await p.start_gateway()
    await p.add_node()
    await p.routable(1)
    client = p.client()
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    await eventually(lambda: _count(p, 1), what="first usage published")
    p.servers.nats.stop()
    await eventually(lambda: _disconnected(p), what="the gateway sees NATS down")
    # Nodes cannot heartbeat now, but the gateway keeps routing to what it knew.
    for _ in range(20):
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    p.servers.nats.start()
    await eventually(lambda: _count(p, 21), timeout=30, what="spooled usage replayed")
    await client.close()
    events = await usage(p)
    assert len(events) == 21 and len({e.request_id for e in events}) == 21


async def _count(p: Platform, n: int) -> bool:
    try:
        return len(await usage(p)) == n
    except Exception:
        return False


async def _disconnected(p: Platform) -> bool:
    return not p.gw.bus.connected


async def test_redis_down_keeps_serving_with_local_limits(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.start_gateway(redis_url=_dead_redis())
    await p.add_node()
    await p.routable(1)
    client = p.client()
    for _ in range(5):
        r = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        assert r.choices
    await client.close()
    m = await _metrics(p)
    assert m[("rate_limit_fallback_total", (("policy", "local"),))] >= 5
    # Still ready (a readiness probe must not take every gateway out), and it says why.
    async with aiohttp.ClientSession() as s, s.get(f"{p.gateway_url}/ready") as r:
        body = await r.json()
    assert r.status == 200 and body["checks"]["redis"].startswith("error")
    assert body["checks"]["postgres"] == body["checks"]["nats"] == "ok"


def _dead_redis() -> Any:
    from services.infra.settings import Secret

    return Secret(f"redis://127.0.0.1:{free_port()}/0")




async def test_several_worker_processes_share_one_port(platform: Platform) -> None:  # noqa: F811
    p = platform
    await p.add_node()
    port = free_port()
    metrics_port = free_port()
    while metrics_port + 1 == port or free_port(metrics_port + 1) != metrics_port + 1:
        metrics_port = free_port()  # two ports in a row: one per worker
    proc = await start_gateway_process(p, port, WORKERS="2", METRICS_PORT=str(metrics_port))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: serving(s, url), timeout=30, what="workers ready")
            await eventually(lambda: _routes(s, url, p.key.plaintext), timeout=15,
                             what="workers route")

            assert len(children_of(proc.pid)) == 2

            async def served() -> float:
                """200s on chat completions, summed over every worker's own metrics port."""
                total = 0.0
                for mp in (metrics_port, metrics_port + 1):
                    async with s.get(f"http://127.0.0.1:{mp}/metrics") as r:
                        assert r.status == 200
                        text = await r.text()
                    total += sum(sample.value for family in text_string_to_metric_families(text)
                                 for sample in family.samples
                                 if sample.name == "http_requests_total"
                                 and sample.labels.get("path") == "/v1/chat/completions"
                                 and sample.labels.get("status") == "200")
                return total

            async def both_up() -> bool:
                try:
                    await served()
                except aiohttp.ClientError:
                    return False
                return True

            await eventually(both_up, timeout=30, what="both workers' metrics ports")
            before = await served()
            statuses = await asyncio.gather(*(chat(s, url, p.key.plaintext) for _ in range(20)))
            assert {status for status, _ in statuses} == {200}
            assert await served() - before == 20  # every request counted, by one worker
            async with s.get(f"{url}/metrics") as r:
                assert r.status == 404  # not on the public port once METRICS_PORT is set
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
