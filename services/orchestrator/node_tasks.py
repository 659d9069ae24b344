"""Launching and terminating nodes, each in its own task so that the tick never waits for a
cloud: how the orchestrator carries out a plan's launches (and replacements) and terminations.

`NodeTasks` is a part of `Orchestrator`: the state it uses is the orchestrator's (set up, and
described, in its __init__), declared here for the type checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from schemas.commands import CommandKind, CommandReply, NodeCommand
from schemas.events import NodeLaunching
from schemas.ids import uuid7
from schemas.subjects import node_command_subject
from services.domain.catalog.weights import InvalidWeightsSource, parse_weights_source
from services.domain.fleet import Fleet, NodeView
from services.domain.node_states import FINAL, Signal
from services.infra.natsauth.authority import NodeIssuer
from services.infra.node_keys import node_api_key
from services.orchestrator.credentials import node_credentials
from services.orchestrator.launcher import (
    Launcher,
    LaunchError,
    LaunchSpec,
    cluster_name,
    node_env,
    split_region,
)
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.reconciler import DeploymentSpec, Launch, Terminate
from services.orchestrator.safety import BackoffKey, LaunchBackoff
from services.orchestrator.settings import OrchestratorSettings

log = structlog.get_logger("orchestrator")

DRAIN_POLL = 0.5


class NodeTasks:
    settings: OrchestratorSettings
    issuer: NodeIssuer | None
    fleet: Fleet
    launcher: Launcher
    nc: NATS
    metrics: OrchestratorMetrics
    wake: asyncio.Event
    launches: dict[uuid.UUID, asyncio.Task[None]]
    _launching_clusters: set[str]
    terminations: dict[uuid.UUID, asyncio.Task[None]]
    cooling: dict[tuple[str, bool], float]
    backoff: LaunchBackoff
    _launch_slots: asyncio.Semaphore

    # ------------------------------------------------------------------ launches

    async def _launch(self, dep: DeploymentSpec, launch: Launch) -> None:
        s = self.settings
        try:
            weights = (None if dep.weights_source is None
                       else parse_weights_source(dep.weights_source))
        except InvalidWeightsSource as exc:
            # The catalog stores only sources it parsed: this is a row written around it.
            log.error("the model's weights source is not one the catalog accepts; not "
                      "launching", deployment_id=str(dep.id), model=dep.model_name,
                      error=str(exc))
            return
        node_id = uuid7()
        provider, region = split_region(launch.region, s.default_provider)
        cluster = cluster_name(s.cluster_prefix, dep.model_name, region, node_id)
        nats_url = (s.node_nats_url.reveal() or s.nats_url.reveal())
        env, secrets = node_env(node_id, cluster=cluster, model_name=dep.model_name,
                                provider=provider, region=region, gpu_type=dep.gpu_type,
                                spot=launch.spot, heartbeat_interval=s.node_heartbeat_interval,
                                nats_url=nats_url)
        credential_key, credential_expires_at = "", None
        if self.issuer is not None:
            # Its own identity, for this node only; its key goes in the log so that it can be
            # revoked when the node ends.
            creds, credential_expires_at = node_credentials(
                self.issuer, node_id, s.node_credential_ttl_seconds, datetime.now(UTC))
            credential_key = creds.public_key
            secrets["NATS_CREDS"] = creds.text()
        # vLLM serves only who holds this node's key: the gateways derive it from the secret.
        secrets["VLLM_API_KEY"] = node_api_key(s.node_api_key_secret, node_id)
        if s.hf_token.reveal():
            secrets["HF_TOKEN"] = s.hf_token.reveal()
        deadline = datetime.now(UTC) + timedelta(seconds=s.launch_deadline_seconds)
        await self.fleet.launching(NodeLaunching(
            node_id=node_id, deployment_id=dep.id, cluster_name=cluster,
            model_name=dep.model_name, provider=provider, region=region,
            gpu_type=dep.gpu_type, spot=launch.spot, deadline=deadline,
            credential_key=credential_key, credential_expires_at=credential_expires_at))
        if launch.replaces is not None:
            await self.fleet.replaced(launch.replaces, node_id, launch.reason, dep.id)
            self.metrics.replacements.inc()
        log.info("launching node", node_id=str(node_id), deployment_id=str(dep.id),
                 cluster=cluster, region=launch.region, spot=launch.spot, reason=launch.reason,
                 replaces=str(launch.replaces) if launch.replaces else None)
        spec = LaunchSpec(node_id=node_id, cluster_name=cluster, model_name=dep.model_name,
                          provider=provider, region=region, gpu_type=dep.gpu_type,
                          spot=launch.spot, env=env, secrets=secrets, weights=weights)
        self.metrics.launches.labels(launch.region, str(launch.spot).lower()).inc()
        self._launching_clusters.add(cluster)
        self.launches[node_id] = asyncio.create_task(
            self._run_launch(spec, (dep.id, launch.region, launch.spot)),
            name=f"launch-{cluster}")

    async def _run_launch(self, spec: LaunchSpec, where: BackoffKey) -> None:
        try:
            async with self._launch_slots:
                await self.launcher.launch(spec)
            self.backoff.succeeded(where)
        except LaunchError as exc:
            kind = "capacity" if exc.capacity else "error"
            self.metrics.launch_failures.labels(kind).inc()
            _, dep_region, spot = where
            if exc.capacity:
                self.cooling[(dep_region, spot)] = (time.monotonic()
                                                    + self.settings.capacity_cooldown_seconds)
                retry_in = self.settings.capacity_cooldown_seconds
            else:
                # Not the cloud's capacity: the same launch would fail the same way now.
                retry_in = self.backoff.failed(where, time.monotonic())
            log.warning("launch failed", node_id=str(spec.node_id), cluster=spec.cluster_name,
                        capacity=exc.capacity, error=str(exc),
                        region_skipped_for_seconds=round(retry_in, 1))
            await self.fleet.signal(spec.node_id, Signal.CLOUD_LOST,
                                    reason=f"launch failed: {exc}"[:500])
            with contextlib.suppress(LaunchError):  # whatever the cloud half-made goes
                await self.launcher.down(spec.cluster_name)
            self.wake.set()  # try again elsewhere now
        finally:
            self.launches.pop(spec.node_id, None)
            self._launching_clusters.discard(spec.cluster_name)

    # ------------------------------------------------------------------ terminations

    def _start_termination(self, node: NodeView, t: Terminate) -> None:
        if node.id in self.terminations:
            return
        self.terminations[node.id] = asyncio.create_task(self._terminate(node, t),
                                                         name=f"terminate-{node.id}")

    async def _terminate(self, node: NodeView, t: Terminate) -> None:
        """Draining → out of the load balancer → in-flight done or deadline → down →
        terminated."""
        bound = log.bind(node_id=str(node.id), cluster=node.cluster_name, reason=t.reason)
        try:
            if t.drain and node.status not in FINAL:
                # Out of every gateway's pool first, whatever the agent does next.
                await self.fleet.signal(node.id, Signal.DRAINING, reason=t.reason)
                if await self._send_drain(node.id, t.reason):
                    await self._wait_ended(node.id, self.settings.drain_timeout_seconds)
            if node.deployment_id is not None:  # only machines we launched are ours to end
                await self.launcher.down(node.cluster_name)
            await self.fleet.terminated(node.id, t.reason, node.cluster_name)
            self.metrics.terminations.inc()
            bound.info("node terminated")
        except LaunchError as exc:
            bound.warning("could not tear the machine down; next tick retries", error=str(exc))
        except (OSError, asyncpg.PostgresError) as exc:
            bound.warning("termination interrupted; next tick retries", error=str(exc))
        finally:
            self.terminations.pop(node.id, None)

    async def _send_drain(self, node_id: uuid.UUID, reason: str) -> bool:
        """True when the agent took the command (it will finish in-flight work and leave)."""
        command = NodeCommand(command=CommandKind.DRAIN, reason=reason, issued_by="orchestrator",
                              deadline_seconds=self.settings.drain_timeout_seconds)
        try:
            msg = await self.nc.request(node_command_subject(node_id),
                                        msgspec.json.encode(command), timeout=3)
            return msgspec.json.decode(msg.data, type=CommandReply).accepted
        except (NatsError, TimeoutError, msgspec.DecodeError) as exc:
            log.info("agent did not take the drain command", node_id=str(node_id),
                     error=type(exc).__name__)
            return False

    async def _wait_ended(self, node_id: uuid.UUID, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.fleet.status(node_id) in FINAL:
                return
            await asyncio.sleep(DRAIN_POLL)  # the agent's deregistration lands in the table
