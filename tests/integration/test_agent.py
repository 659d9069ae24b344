"""The node agent with the vLLM simulator, a local cloud metadata service and real NATS.

The test plays the control plane: it listens on the node subjects and acknowledges
registrations on ``node.ack.<id>`` as the monitor does.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg
from openai import AsyncOpenAI
from structlog.testing import capture_logs

from agent.local_cloud.metadata import STATE, MetadataState, create_metadata_app
from agent.node_agent import EXIT_REFUSED, EXIT_REJECTED, NodeAgent
from agent.settings import AgentSettings
from agent.simulator import SimulatorConfig, create_app
from schemas.commands import CommandReply, NodeCommand, RegistrationAck
from schemas.events import Event, NodeHeartbeat, NodeRegistered, decode_event
from schemas.ids import uuid7
from schemas.subjects import node_ack_subject, node_command_subject
from services.cli.nats_commands import revoke_keys
from services.infra.bus import Bus
from services.infra.devstack import free_port
from services.infra.natsauth.authority import NodeIssuer
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.revocations import AccountResolver
from services.infra.settings import Secret
from tests.conftest import Servers
from tests.helpers import eventually

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class Served:
    url: str
    app: web.Application
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def serve(app: web.Application) -> Served:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Served(f"http://127.0.0.1:{port}", app, runner)


@pytest.fixture
async def start_simulator() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    started: list[Served] = []

    async def start(**config: Any) -> Served:
        served = await serve(create_app(SimulatorConfig(model=MODEL, **config)))
        started.append(served)
        return served

    yield start
    for s in started:
        await s.stop()


@pytest.fixture
async def metadata() -> AsyncIterator[Served]:
    served = await serve(create_metadata_app())
    yield served
    await served.stop()


@dataclass
class ControlPlane:
    """Records what agents publish on node.>; acknowledges registrations unless told not to.

    With `watching` set, only the nodes named in it count: NATS is shared by the whole
    session, and a node some earlier test left behind must not show up in this one."""

    nc: NATS
    events: list[tuple[float, Event]] = field(default_factory=list)
    ignore_registrations: int = 0
    reject: str | None = None
    registrations: list[NodeRegistered] = field(default_factory=list)
    watching: set[str] | None = None

    def watch(self, node_id: object) -> None:
        if self.watching is None:
            self.watching = set()
        self.watching.add(str(node_id))

    async def on_msg(self, msg: Msg) -> None:
        if msg.subject.startswith(("node.ack.", "node.command.")):
            return
        event = decode_event(msg.data)
        if self.watching is not None and str(getattr(event, "node_id", "")) not in self.watching:
            return
        self.events.append((time.monotonic(), event))
        if isinstance(event, NodeRegistered):
            self.registrations.append(event)
            if len(self.registrations) <= self.ignore_registrations:
                return
            ack = RegistrationAck(node_id=event.node_id, event_id=event.id,
                                  accepted=self.reject is None, reason=self.reject or "")
            await self.nc.publish(node_ack_subject(event.node_id), msgspec.json.encode(ack))

    def of_type(self, event_type: str) -> list[Any]:
        return [e for _, e in self.events if e.type == event_type]

    def when(self, event_type: str) -> float:
        return next(t for t, e in self.events if e.type == event_type)

    async def wait_for(self, event_type: str, count: int = 1, timeout: float = 10) -> list[Any]:
        async def enough() -> list[Any] | None:
            found = self.of_type(event_type)
            return found if len(found) >= count else None

        return await eventually(enough, timeout=timeout, what=f"{count} x {event_type}")


@pytest.fixture
async def control_plane(servers: Servers, bus: Bus, nats_url: str
                        ) -> AsyncIterator[ControlPlane]:
    nc = await servers.nats_client(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    cp = ControlPlane(nc)
    await nc.subscribe("node.>", cb=cp.on_msg)
    await nc.flush()
    yield cp
    await nc.close()


def agent_settings(servers: Servers, vllm_url: str, **overrides: Any) -> AgentSettings:
    """An agent's settings with its own node credential, as the orchestrator launches it."""
    node_id = overrides.pop("node_id", None) or uuid7()
    base: dict[str, Any] = dict(
        nats_url=Secret(servers.nats_url), node_id=node_id,
        nats_creds=Secret(servers.node_creds(node_id)), cluster_name="crosslogic-llama-8b-test",
        provider="aws", region="us-east-1", instance_type="g5.2xlarge", gpu_type="A10G",
        vram_total_gb=24, model_name=MODEL, vllm_url=vllm_url,
        endpoint_url="http://10.0.1.45:8000", spot_instance=False, heartbeat_interval=0.2,
        registration_timeout=0.3, drain_grace=0.1, drain_poll_interval=0.05,
        spot_poll_interval=0.05, log_json=False)
    base.update(overrides)
    return AgentSettings(**base)


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[[AgentSettings], asyncio.Task[int]]]:
    tasks: list[asyncio.Task[int]] = []
    agents: list[NodeAgent] = []

    def start(settings: AgentSettings) -> asyncio.Task[int]:
        agent = NodeAgent(settings)
        agents.append(agent)
        task = asyncio.create_task(agent.run())
        task.agent = agent  # type: ignore[attr-defined]
        tasks.append(task)
        return task

    yield start
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

@dataclass
class Rig:
    """Everything an agent test needs: NATS, a control plane, simulators, agents."""

    cp: ControlPlane
    servers: Servers
    bus: Bus
    start_simulator: Callable[..., Awaitable[Served]]
    run_agent: Callable[[AgentSettings], asyncio.Task[int]]

    def settings(self, vllm_url: str, **overrides: Any) -> AgentSettings:
        settings = agent_settings(self.servers, vllm_url, **overrides)
        self.cp.watch(settings.node_id)
        return settings


@pytest.fixture
def rig(control_plane: ControlPlane, servers: Servers, nats_url: str, bus: Bus,
        start_simulator: Callable[..., Awaitable[Served]],
        run_agent: Callable[[AgentSettings], asyncio.Task[int]]) -> Rig:
    return Rig(control_plane, servers, bus, start_simulator, run_agent)


# --------------------------------------------------------------------------- registration


async def test_registers_and_publishes_again_until_acknowledged(rig: Rig) -> None:
    sim = await rig.start_simulator()
    rig.cp.ignore_registrations = 2
    settings = rig.settings(sim.url)
    task = rig.run_agent(settings)
    agent: NodeAgent = task.agent
    await asyncio.wait_for(agent.registered.wait(), 15)

    regs = rig.cp.registrations
    assert len(regs) == 3  # two went unanswered
    assert len({r.id for r in regs}) == 1  # the same event each time
    reg = regs[0]
    assert (reg.node_id, reg.cluster_name, reg.provider, reg.region, reg.instance_type,
            reg.gpu_type, reg.vram_total_gb, reg.model_name, reg.endpoint_url,
            reg.spot_instance) == (settings.node_id, "crosslogic-llama-8b-test", "aws",
                                   "us-east-1", "g5.2xlarge", "A10G", 24, MODEL,
                                   "http://10.0.1.45:8000", False)
    assert reg.agent_version
    # The first retry found the message stored already, so it sent a copy under a message id
    # of its own (the stream would hide the retry from the monitor); the event is the same.
    assert (await rig.bus.js.stream_info("NODES")).state.messages == 2


async def test_a_lost_acknowledgment_is_asked_for_again_at_once(rig: Rig) -> None:
    """The monitor acks what it reads from JetStream, after recording it. When that ack is
    lost, a retry must reach the monitor again: one deduplicated by the stream's window
    (two minutes) never would."""
    sim = await rig.start_simulator()
    rig.cp.ignore_registrations = 10**6  # only the JetStream reader below acknowledges
    settings = rig.settings(sim.url)
    recorded: list[NodeRegistered] = []

    async def monitor(msg: Msg) -> None:
        event = decode_event(msg.data)
        assert isinstance(event, NodeRegistered)
        recorded.append(event)
        if len(recorded) == 1:
            return  # recorded, but this ack never reaches the agent
        ack = RegistrationAck(node_id=event.node_id, event_id=event.id)
        await rig.cp.nc.publish(node_ack_subject(event.node_id), msgspec.json.encode(ack))

    sub = await rig.bus.js.subscribe(f"node.registered.{settings.node_id}", stream="NODES",
                                     cb=monitor)
    try:
        task = rig.run_agent(settings)
        agent: NodeAgent = task.agent
        await asyncio.wait_for(agent.registered.wait(), 10)
    finally:
        await sub.unsubscribe()
    assert len(recorded) == 2 and recorded[0].id == recorded[1].id  # one event, read twice


async def test_rejected_registration_stops_the_agent(rig: Rig) -> None:
    sim = await rig.start_simulator()
    rig.cp.reject = "unknown cluster"
    code = await asyncio.wait_for(rig.run_agent(rig.settings(sim.url)), 15)
    assert code == EXIT_REJECTED
    assert rig.cp.of_type("node.draining") == []


# --------------------------------------------------------------------------- heartbeats


async def test_heartbeats_at_the_interval_and_through_vllm_trouble(rig: Rig) -> None:
    sim = await rig.start_simulator()
    rig.run_agent(rig.settings(sim.url, heartbeat_interval=0.25))
    beats = await rig.cp.wait_for("node.heartbeat", 5)
    first: NodeHeartbeat = beats[0]
    assert [b.sequence for b in beats[:5]] == [1, 2, 3, 4, 5]
    assert first.vllm_healthy and first.health_score == 100
    assert first.num_requests_running == 0 and first.num_requests_waiting == 0
    assert first.kv_cache_usage is not None and first.model_name == MODEL
    times = [t for t, e in rig.cp.events if e.type == "node.heartbeat"][:5]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.15 <= g <= 0.6 for g in gaps), gaps

    # vLLM says it is unhealthy: heartbeats go on and say so.
    async with aiohttp.ClientSession() as s, \
            s.post(f"{sim.url}/admin/faults", json={"health_503": True}) as r:
        assert r.status == 200

    async def unhealthy_beat() -> bool:
        last = rig.cp.of_type("node.heartbeat")[-1]
        return not last.vllm_healthy and last.health_score == 0

    await eventually(unhealthy_beat, what="an unhealthy heartbeat")

    # vLLM gone entirely: still heartbeats, nothing crashes.
    await sim.stop()
    seen = len(rig.cp.of_type("node.heartbeat"))
    beats = await rig.cp.wait_for("node.heartbeat", seen + 3)
    assert all(not b.vllm_healthy and b.num_requests_running is None for b in beats[-3:])


async def test_heartbeats_carry_load_and_token_rate(rig: Rig) -> None:
    sim = await rig.start_simulator(max_num_seqs=1, inter_token_latency=0.02)
    rig.run_agent(rig.settings(sim.url, heartbeat_interval=0.2))
    client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    requests = [asyncio.create_task(client.completions.create(
        model=MODEL, prompt="tell me a story", max_tokens=40)) for _ in range(3)]
    try:
        async def busy_beat() -> NodeHeartbeat | None:
            for beat in rig.cp.of_type("node.heartbeat"):
                if beat.num_requests_running == 1 and (beat.num_requests_waiting or 0) >= 1:
                    return beat  # type: ignore[no-any-return]
            return None

        beat = await eventually(busy_beat, what="a heartbeat showing the queue")
        assert beat.health_score < 100  # waiting requests lower it

        async def generating() -> bool:
            return any((b.tokens_per_second or 0) > 0
                       for b in rig.cp.of_type("node.heartbeat"))

        await eventually(generating, what="a heartbeat with a token rate")
    finally:
        await asyncio.gather(*requests)
        await client.close()


def vllm_with_broken_metrics(mode: dict[str, str]) -> web.Application:
    """A vLLM whose engine is fine (/health 200) but whose /metrics is broken the way
    `mode["metrics"]` says: garbage text, a 500, or a load of +Inf (else it is fine)."""
    good = (f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n'
            f'vllm:num_requests_waiting{{model_name="{MODEL}"}} WAITING\n'
            f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.1\n')

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(request: web.Request) -> web.Response:
        match mode["metrics"]:
            case "garbage":
                return web.Response(text="<html>proxy error {{{")
            case "500":
                return web.Response(status=500, text="Internal Server Error")
            case "inf":
                return web.Response(text=good.replace("WAITING", "+Inf"))
        return web.Response(text=good.replace("WAITING", "0.0"))

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def test_heartbeats_go_on_when_only_metrics_are_broken(rig: Rig) -> None:
    mode = {"metrics": "garbage"}
    vllm = await serve(vllm_with_broken_metrics(mode))
    try:
        task = rig.run_agent(rig.settings(vllm.url, heartbeat_interval=0.1))
        for broken in ("garbage", "500", "inf"):
            mode["metrics"] = broken
            seen = len(rig.cp.of_type("node.heartbeat"))
            beats = await rig.cp.wait_for("node.heartbeat", seen + 3)
            last: NodeHeartbeat = beats[-1]
            assert last.vllm_healthy and last.health_score == 60, (broken, last)
            assert last.num_requests_running is None and last.kv_cache_usage is None
        mode["metrics"] = "ok"

        async def whole_again() -> bool:
            last = rig.cp.of_type("node.heartbeat")[-1]
            return bool(last.health_score == 100 and last.num_requests_waiting == 0)

        await eventually(whole_again, what="a full score once /metrics is back")
        assert not task.done()
    finally:
        await vllm.stop()


async def test_load_is_read_when_vllm_serves_under_another_name(rig: Rig) -> None:
    """MODEL_NAME and vLLM's --served-model-name differ: the one model's load still counts."""
    sim = await rig.start_simulator()
    task = rig.run_agent(rig.settings(sim.url, model_name="llama-8b"))
    with capture_logs() as logs:
        beats = await rig.cp.wait_for("node.heartbeat", 3)
    assert all(b.health_score == 100 and b.num_requests_running == 0 for b in beats)
    warned = [e for e in logs if e["event"].startswith("vllm reports another model")]
    assert len(warned) == 1 and warned[0]["vllm_model"] == MODEL
    assert not task.done()


# --------------------------------------------------------------------------- spot notices


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
async def test_spot_notice_warns_at_once_then_drains(provider: str, rig: Rig,
                                                     metadata: Served) -> None:
    sim = await rig.start_simulator()
    state: MetadataState = metadata.app[STATE]
    task = rig.run_agent(rig.settings(sim.url, provider=provider, spot_instance=True,
                                    metadata_url=metadata.url))
    agent: NodeAgent = task.agent
    await asyncio.wait_for(agent.registered.wait(), 10)

    async def polled() -> bool:
        return provider in state.requests

    await eventually(polled, what="the agent polls the metadata service")
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
    if provider == "aws":
        state.aws_notice("terminate", when)
    elif provider == "gcp":
        state.gcp_preempt()
    else:
        state.azure_preempt(when)
    noticed_at = datetime.now(UTC)

    (warning,) = await rig.cp.wait_for("node.spot_warning")
    assert warning.provider == provider and warning.node_id == agent.node_id
    if provider == "gcp":  # GCP gives 30 seconds from the notice
        assert warning.deadline is not None
        assert abs((warning.deadline - noticed_at).total_seconds() - 30) < 5
    else:
        assert warning.deadline == when
    assert await asyncio.wait_for(task, 10) == 0
    assert rig.cp.when("node.spot_warning") <= rig.cp.when("node.draining")
    (draining,) = rig.cp.of_type("node.draining")
    assert draining.deadline <= warning.deadline
    assert rig.cp.of_type("node.deregistered")


async def test_spot_notice_while_nats_is_down_still_drains(servers: Servers, rig: Rig,
                                                            metadata: Served) -> None:
    """The cloud takes the node at its deadline whether NATS answers or not: the drain must
    not wait for the warning to be published (Azure may even leave NotBefore empty)."""
    if servers.nats is None:
        pytest.skip("needs the embedded NATS server to stop it")
    sim = await rig.start_simulator()
    state: MetadataState = metadata.app[STATE]
    task = rig.run_agent(rig.settings(sim.url, provider="azure", spot_instance=True,
                                      metadata_url=metadata.url))
    agent: NodeAgent = task.agent
    agent.leave_grace = 0.5
    await asyncio.wait_for(agent.registered.wait(), 10)
    servers.nats.stop()
    try:
        async def disconnected() -> bool:
            return agent.bus is not None and not agent.bus.connected

        await eventually(disconnected, what="the agent notices NATS is down")
        state.azure_events.append({"EventId": "e1", "EventType": "Preempt",
                                   "ResourceType": "VirtualMachine", "Resources": ["node-0"],
                                   "EventStatus": "Scheduled", "NotBefore": ""})
        assert await asyncio.wait_for(task, 15) == 0
    finally:
        servers.nats.start()
    assert agent.draining
    # Tried in order, and given up on when the leaving grace ran out.
    assert agent.unannounced[:1] == ["node.spot_warning"]


async def test_spot_notice_brings_an_operator_drain_deadline_forward(
        rig: Rig, metadata: Served) -> None:
    """An operator's drain allows 120 s; the cloud then says the node goes in a few seconds.
    The earlier deadline wins, though a long request is still in flight."""
    sim = await rig.start_simulator(inter_token_latency=0.05)
    state: MetadataState = metadata.app[STATE]
    task = rig.run_agent(rig.settings(sim.url, provider="aws", spot_instance=True,
                                      metadata_url=metadata.url))
    agent: NodeAgent = task.agent
    await asyncio.wait_for(agent.registered.wait(), 10)
    client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    long_request = asyncio.create_task(client.completions.create(
        model=MODEL, prompt="a very long story", max_tokens=2000))  # ~100 s
    try:
        async def running() -> bool:
            o = await agent.observe()
            return o.load is not None and o.load.running == 1

        await eventually(running, what="the long request in flight")
        command = NodeCommand(command="drain", reason="scale down", deadline_seconds=120)
        reply = await rig.cp.nc.request(node_command_subject(agent.node_id),
                                        msgspec.json.encode(command), timeout=5)
        assert msgspec.json.decode(reply.data, type=CommandReply).detail == "draining"
        await rig.cp.wait_for("node.draining")

        when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        state.aws_notice("terminate", when)
        assert await asyncio.wait_for(task, 15) == 0
        assert not long_request.done()  # it was cut off by the deadline, not waited for
    finally:
        long_request.cancel()
        await asyncio.gather(long_request, return_exceptions=True)
        await client.close()
    assert agent.drain_deadline == when
    (warning,) = rig.cp.of_type("node.spot_warning")
    assert warning.deadline == when
    assert rig.cp.of_type("node.deregistered")


async def test_spot_watch_survives_nonsense_from_the_metadata_service(
        rig: Rig, metadata: Served) -> None:
    """A body that is not the documented shape is one failed look, not the end of watching."""
    sim = await rig.start_simulator()
    state: MetadataState = metadata.app[STATE]
    state.aws_action = {"action": "terminate", "time": 1764145320}  # type: ignore[dict-item]
    task = rig.run_agent(rig.settings(sim.url, provider="aws", spot_instance=True,
                                      metadata_url=metadata.url))
    agent: NodeAgent = task.agent
    await asyncio.wait_for(agent.registered.wait(), 10)

    async def polled_again(after: int) -> bool:
        return state.requests.count("aws") >= after + 2

    await eventually(lambda: polled_again(0), what="polls of a nonsense notice")
    state.aws_action = ["terminate"]  # type: ignore[assignment]
    seen = state.requests.count("aws")
    await eventually(lambda: polled_again(seen), what="polls go on after nonsense")
    assert not task.done() and not rig.cp.of_type("node.spot_warning")

    when = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
    state.aws_notice("terminate", when)
    assert await asyncio.wait_for(task, 10) == 0
    (warning,) = rig.cp.of_type("node.spot_warning")
    assert warning.deadline == when


async def test_metadata_service_down_is_not_fatal(rig: Rig) -> None:
    sim = await rig.start_simulator()
    task = rig.run_agent(rig.settings(sim.url, provider="aws", spot_instance=True,
                                    metadata_url=f"http://127.0.0.1:{free_port()}"))
    await rig.cp.wait_for("node.heartbeat", 3)
    assert not task.done()


# --------------------------------------------------------------------------- drain


async def test_drain_command_lets_in_flight_requests_finish(rig: Rig) -> None:
    sim = await rig.start_simulator(inter_token_latency=0.02)
    task = rig.run_agent(rig.settings(sim.url))
    agent: NodeAgent = task.agent
    await asyncio.wait_for(agent.registered.wait(), 10)
    client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    finished: list[float] = []

    async def one() -> str | None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count slowly"}], max_tokens=40,
            stream=True)
        reason = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        finished.append(time.monotonic())
        return reason

    requests = [asyncio.create_task(one()) for _ in range(3)]
    try:
        async def all_running() -> bool:
            load = await agent.observe()
            return load.load is not None and load.load.running == 3

        await eventually(all_running, what="three requests in flight")
        command = NodeCommand(command="drain", reason="scale down", deadline_seconds=30,
                              issued_by="test")
        reply_msg = await rig.cp.nc.request(node_command_subject(agent.node_id),
                                                   msgspec.json.encode(command), timeout=5)
        reply = msgspec.json.decode(reply_msg.data, type=CommandReply)
        assert reply.accepted and reply.detail == "draining"

        assert await asyncio.wait_for(task, 15) == 0
        reasons = await asyncio.gather(*requests)
    finally:
        await client.close()
    assert reasons == ["length"] * 3  # every in-flight request ran to its end
    assert rig.cp.when("node.draining") < min(finished)
    assert rig.cp.when("node.deregistered") >= max(finished)
    (draining,) = rig.cp.of_type("node.draining")
    assert draining.reason == "command: scale down"
    assert any(b.draining for b in rig.cp.of_type("node.heartbeat"))


async def test_bad_command_is_refused(rig: Rig) -> None:
    sim = await rig.start_simulator()
    task = rig.run_agent(rig.settings(sim.url))
    agent: NodeAgent = task.agent
    await asyncio.wait_for(agent.registered.wait(), 10)
    msg = await rig.cp.nc.request(node_command_subject(agent.node_id),
                                         b'{"command": "explode"}', timeout=5)
    reply = msgspec.json.decode(msg.data, type=CommandReply)
    assert not reply.accepted and "explode" in reply.detail
    assert not task.done()


async def test_sigterm_drains_and_exits_zero(rig: Rig) -> None:
    sim = await rig.start_simulator()
    node_id = str(uuid.uuid4())
    rig.cp.watch(node_id)
    env = {**os.environ, "NATS_URL": rig.servers.nats_url, "NODE_ID": node_id,
           "NATS_CREDS": rig.servers.node_creds(node_id), "VLLM_URL": sim.url,
           "MODEL_NAME": MODEL, "HEARTBEAT_INTERVAL": "0.2", "DRAIN_GRACE": "0.1",
           "LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent", env=env)
    try:
        await rig.cp.wait_for("node.heartbeat", 1, timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    (dereg,) = rig.cp.of_type("node.deregistered")
    assert str(dereg.node_id) == node_id and dereg.reason == "signal SIGTERM"


async def test_sigterm_bounds_the_drain_by_its_own_timeout(rig: Rig) -> None:
    """SIGTERM comes from something that kills soon after (Kubernetes: 30 s). Even during an
    operator's 120 s drain, with a long request in flight, the agent leaves within
    SIGTERM_DRAIN_TIMEOUT, and cleanly: a first signal is not the "second signal" exit."""
    sim = await rig.start_simulator(inter_token_latency=0.05)
    node_id = str(uuid.uuid4())
    rig.cp.watch(node_id)
    env = {**os.environ, "NATS_URL": rig.servers.nats_url, "NODE_ID": node_id,
           "NATS_CREDS": rig.servers.node_creds(node_id), "VLLM_URL": sim.url,
           "MODEL_NAME": MODEL, "HEARTBEAT_INTERVAL": "0.2", "DRAIN_GRACE": "0.1",
           "SIGTERM_DRAIN_TIMEOUT": "1", "LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent", env=env)
    client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    long_request = asyncio.create_task(client.completions.create(
        model=MODEL, prompt="a very long story", max_tokens=2000))  # ~100 s
    try:
        await rig.cp.wait_for("node.heartbeat", 1, timeout=20)
        command = NodeCommand(command="drain", reason="scale down", deadline_seconds=120)
        await rig.cp.nc.request(node_command_subject(node_id), msgspec.json.encode(command),
                                timeout=5)
        await rig.cp.wait_for("node.draining")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert not long_request.done()
    finally:
        long_request.cancel()
        await asyncio.gather(long_request, return_exceptions=True)
        await client.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    (dereg,) = rig.cp.of_type("node.deregistered")
    assert dereg.reason == "command: scale down"


async def test_sigterm_while_nats_is_unreachable_exits_at_once() -> None:
    """A node reclaimed before the control plane was ever reachable must still stop in time."""
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{free_port()}",
           "NODE_ID": str(uuid.uuid4()), "VLLM_URL": f"http://127.0.0.1:{free_port()}",
           "MODEL_NAME": MODEL, "LOG_JSON": "true", "LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent", env=env,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while b"nats" not in (line := await proc.stderr.readline()):
                assert line, "the agent exited before trying NATS"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --------------------------------------------------------------------------- NATS trouble


async def test_survives_a_nats_restart(servers: Servers, rig: Rig) -> None:
    if servers.nats is None:
        pytest.skip("needs the embedded NATS server to restart it")
    sim = await rig.start_simulator()
    task = rig.run_agent(rig.settings(sim.url))
    agent: NodeAgent = task.agent
    await rig.cp.wait_for("node.heartbeat", 2)
    servers.nats.stop()

    async def noticed() -> bool:
        return agent.bus is not None and not agent.bus.connected

    await eventually(noticed, what="the agent notices NATS is down")
    before = max(b.sequence for b in rig.cp.of_type("node.heartbeat"))
    servers.nats.start()

    async def resumed() -> bool:
        return any(b.sequence > before + 1 for b in rig.cp.of_type("node.heartbeat"))

    await eventually(resumed, timeout=20, what="heartbeats after the restart")
    assert not task.done()


async def test_starts_before_nats_is_up(servers: Servers, nats_url: str, bus: Bus,
                                        start_simulator: Any,
                                        run_agent: Any) -> None:
    if servers.nats is None:
        pytest.skip("needs the embedded NATS server to stop it")
    sim = await start_simulator()
    servers.nats.stop()
    task = run_agent(agent_settings(servers, sim.url))
    agent: NodeAgent = task.agent

    async def trying() -> bool:
        # The NATS client itself retries a first connection for ever (max_reconnect -1).
        return agent.connecting and agent.bus is None

    await eventually(trying, what="the agent tries NATS while it is down")
    servers.nats.start()
    nc = await servers.nats_client()
    cp = ControlPlane(nc)
    try:
        await nc.subscribe("node.>", cb=cp.on_msg)
        await asyncio.wait_for(agent.registered.wait(), 20)
    finally:
        await nc.close()
    assert not task.done()



# --------------------------------------------------------------------------- refused credentials


async def revoke_now(servers: Servers, creds: Secret) -> None:
    """What `crosslogic nats revoke` (or the orchestrator's keeper, once the node has ended)
    does: the credential's key revoked in the account, pushed to the servers."""
    issuer = NodeIssuer.from_json(servers.node_issuer())
    nc = await nats.connect(servers.nats_url,
                            user_credentials=RawCredentials(issuer.system_creds.text()))
    try:
        await revoke_keys(AccountResolver(nc, issuer.account),
                          [Credentials.parse(creds.reveal()).public_key],
                          signing_seed=issuer.operator_signing_seed, now=int(time.time()),
                          settle=0)
    finally:
        await nc.close()


async def expired_credential(servers: Servers, node_id: uuid.UUID) -> Secret:
    issuer = NodeIssuer.from_json(servers.node_issuer())
    return Secret(issuer.node_credentials(node_id, ttl_seconds=60,
                                          now=time.time() - 3600).text())


@pytest.mark.parametrize("refusal", ["revoked", "expired", "none"])
async def test_an_agent_whose_credential_is_refused_exits_4_at_start(rig: Rig,
                                                                     refusal: str) -> None:
    """Revoked before the node came up (it ended while its machine was still booting),
    expired, or none at all: no retry can change that, so the agent says so and leaves."""
    sim = await rig.start_simulator()
    settings = rig.settings(sim.url)
    if refusal == "revoked":
        await revoke_now(rig.servers, settings.nats_creds)
    elif refusal == "expired":
        settings = msgspec.structs.replace(
            settings, nats_creds=await expired_credential(rig.servers, settings.node_id))
    else:
        settings = msgspec.structs.replace(settings, nats_creds=Secret(""))
    with capture_logs() as logs:
        task = rig.run_agent(settings)
        assert await asyncio.wait_for(task, 20) == EXIT_REFUSED
    refused = [e for e in logs if e["event"] == "nats refused this node's credential"]
    assert refused and str(settings.node_id) in refused[0]["error"]
    assert rig.servers.nats_url not in refused[0]["error"]
    assert not rig.cp.of_type("node.registered")


class Relay:
    """The node's network: a TCP path to NATS that the test can cut and restore (same port),
    as a network blip, or a NATS restart the node cannot see the end of, would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port,
                                                 reuse_address=True)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.pipes):
            writer.close()
        self.pipes.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.pipes.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()
                self.pipes.discard(dst)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_an_agent_revoked_while_nats_was_down_exits_4_when_it_is_back(
        servers: Servers, rig: Rig) -> None:
    """nats-py fires closed_cb only when the -ERR reaches a live connection: a node revoked
    while it was cut off met the refusal on every reconnection, and retried twice a second
    for ever. Now a few refusals in a row close it for good, and the agent leaves."""
    if servers.nats is None:
        pytest.skip("needs the embedded NATS server to stop it")
    relay = Relay(servers.nats.port)
    await relay.start()
    sim = await rig.start_simulator()
    settings = rig.settings(sim.url, nats_url=Secret(relay.url))
    task = rig.run_agent(settings)
    agent: NodeAgent = task.agent
    try:
        await rig.cp.wait_for("node.heartbeat", 1)
        servers.nats.stop()
        await relay.cut()  # the node's side stays down a little longer than NATS

        async def noticed() -> bool:
            return agent.bus is not None and not agent.bus.connected

        await eventually(noticed, what="the agent notices NATS is down")
        servers.nats.start()
        await revoke_now(servers, settings.nats_creds)  # the node ended meanwhile
        await relay.start()
        assert await asyncio.wait_for(task, 30) == EXIT_REFUSED
        assert agent.bus is not None and agent.bus.closed.is_set()
    finally:
        await relay.cut()
