"""What the agent sees of its node and reports in each heartbeat: vLLM's health and its load
(from vLLM's /metrics), GPU utilisation, the health score they make, and the NodeHeartbeat
built from them. Looking never raises: what cannot be seen lowers the score."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import structlog

from agent.gpu import GpuReading, read_gpu
from agent.health_score import HealthInputs, health_score
from agent.settings import AgentSettings
from agent.vllm_metrics import MetricsError, VllmLoad, parse_vllm_metrics, tokens_per_second
from schemas.events import NodeHeartbeat

log = structlog.get_logger("agent")


@dataclass(frozen=True)
class Observation:
    vllm_healthy: bool
    load: VllmLoad | None
    gpu: GpuReading
    tokens_per_second: float | None
    score: int


class NodeObserver:
    """Looks at vLLM and the GPU; remembers the last token count (for a rate) and the last
    metrics problem (to say each change once)."""

    def __init__(self, settings: AgentSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._session = session
        self._last_tokens: tuple[float, float] | None = None
        self._metrics_problem: str | None = None

    async def observe(self) -> Observation:
        """Look at vLLM and the GPU. Never raises: what cannot be seen lowers the score."""
        healthy, load, gpu = await asyncio.gather(self.vllm_healthy(), self.vllm_load(),
                                                  read_gpu(self.settings.http_timeout))
        now = time.monotonic()
        rate = None
        current = load.generation_tokens_total if load else None
        if self._last_tokens is not None:
            rate = tokens_per_second(self._last_tokens[1], current, now - self._last_tokens[0])
        if current is not None:
            self._last_tokens = (now, current)
        score = health_score(HealthInputs(
            vllm_healthy=healthy, metrics_ok=load is not None,
            num_requests_waiting=load.waiting if load else None,
            kv_cache_usage=load.kv_cache_usage if load else None,
            gpu_probe_failed=gpu.failed))
        return Observation(healthy, load, gpu, rate, score)

    async def vllm_healthy(self) -> bool:
        try:
            async with self._session.get(f"{self.settings.vllm_url}/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def vllm_load(self) -> VllmLoad | None:
        problem: str | None = None
        load = None
        try:
            async with self._session.get(f"{self.settings.vllm_url}/metrics") as resp:
                if resp.status != 200:
                    problem = f"HTTP {resp.status}"
                else:
                    load = parse_vllm_metrics(await resp.text(), self.settings.model_name)
        except (aiohttp.ClientError, TimeoutError, MetricsError, UnicodeDecodeError) as exc:
            problem = str(exc) or type(exc).__name__
        if load is not None and load.model not in (None, self.settings.model_name):
            problem = f"serves {load.model!r}, not MODEL_NAME"
        if problem != self._metrics_problem:  # said once per change, not every heartbeat
            if problem is None:
                log.info("vllm metrics readable again")
            elif load is not None:
                # Read anyway (it is the only model), but requests routed under MODEL_NAME
                # will find no such model: the operator should know.
                log.warning("vllm reports another model than MODEL_NAME; reading its load",
                            model_name=self.settings.model_name, vllm_model=load.model)
            else:
                log.warning("vllm metrics unreadable", problem=problem)
            self._metrics_problem = problem
        return load


def heartbeat_event(settings: AgentSettings, sequence: int, o: Observation, *,
                    draining: bool) -> NodeHeartbeat:
    return NodeHeartbeat(
        node_id=settings.node_id, sequence=sequence, health_score=o.score,
        vllm_healthy=o.vllm_healthy, model_name=settings.model_name,
        num_requests_running=o.load.running if o.load else None,
        num_requests_waiting=o.load.waiting if o.load else None,
        kv_cache_usage=o.load.kv_cache_usage if o.load else None,
        tokens_per_second=o.tokens_per_second, gpu_utilization=o.gpu.utilization,
        draining=draining)
