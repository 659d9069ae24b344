"""The leader's loop: keep every deployment's nodes between its bounds, launch, replace,
terminate. Decisions are the pure functions next door (autoscaler, reconciler); this module
feeds them and carries them out.

Each tick (every `reconcile_every_seconds`, or sooner when a node event arrives):
1. the cloud's view (every `cloud_check_every_seconds`): a node whose machine the launcher no
   longer has is failed (the third safety signal); machines no live node owns are torn down;
2. per deployment: its load from the heartbeats in Redis → the desired count → a plan;
3. the plan: deadline failures, launches (recorded as `node.launching` *before* the cloud is
   asked, so a new leader after a failover counts them and does not launch again),
   replacements (`node.replaced`), terminations (recorded as `node.terminate_requested`, then
   drained, torn down and closed with `node.terminated`, each in its own task).

Launches and terminations run as tasks (node_tasks); the tick never waits for a cloud.

A node event seen on NATS wakes the leader at once, but the `nodes` table may not have it yet:
an agent's spot notice is recorded by the monitor a moment later, and its projection later
still. So the leader notes the event (`observe`), and before each tick brings the rows of
nodes whose noted events are now in the log up to date itself (Fleet.catch_up); while some
are not in the log yet, it waits on the log's notifications as well as on NATS. A spot notice
is acted on as soon as it is recorded, whatever RECONCILE_EVERY_SECONDS says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis
import structlog
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from schemas.events import DeploymentNoActiveNodes, Event, EventMetadata, NodeStatus
from services.domain.fleet import Fleet, NodeView
from services.domain.node_hot_data import latest_heartbeats
from services.domain.node_states import FINAL, Signal
from services.infra.aio import stop_tasks, wait_event
from services.infra.eventlog import ANY, EventLog
from services.infra.log_waker import LogWaker
from services.infra.natsauth.authority import NodeIssuer
from services.orchestrator.autoscaler import NodeLoad, ScaleMemory, ScalePolicy, decide_scale
from services.orchestrator.cloud_view import cloud_view
from services.orchestrator.credentials import CredentialKeeper
from services.orchestrator.launcher import Launcher, LaunchError
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.node_tasks import NodeTasks
from services.orchestrator.reconciler import (
    DeploymentSpec,
    Plan,
    Situation,
    Terminate,
    plan_deployment,
)
from services.orchestrator.safety import LaunchBackoff, believable_cloud_losses
from services.orchestrator.settings import OrchestratorSettings

log = structlog.get_logger("orchestrator")

LIVE = frozenset(NodeStatus) - FINAL
AWAIT_RECORDING = 30.0
"""How long a node event seen on NATS is waited for in the log (one the monitor refused never
arrives)."""


class Orchestrator(NodeTasks):
    def __init__(self, settings: OrchestratorSettings, *, eventlog: EventLog,
                 redis: aioredis.Redis, nc: NATS, launcher: Launcher,
                 registry: CollectorRegistry | None = None,
                 waker: LogWaker | None = None,
                 issuer: NodeIssuer | None = None,
                 credentials: CredentialKeeper | None = None) -> None:
        self.settings = settings
        self.issuer = issuer
        """Mints each launched node's NATS credential (None: nodes get none, for tests of
        plans that launch nothing real)."""
        self.credentials = credentials
        self.waker = waker
        self.eventlog = eventlog
        self.fleet = Fleet(eventlog, actor="orchestrator")
        self.redis = redis
        self.nc = nc
        self.launcher = launcher
        self.metrics = OrchestratorMetrics(registry)
        self.policy = ScalePolicy(
            waiting_per_node_high=settings.scale_up_waiting_per_node,
            kv_cache_high=settings.scale_up_kv_cache,
            running_per_node_low=settings.scale_down_running_per_node,
            up_delay=settings.scale_up_delay_seconds,
            down_delay=settings.scale_down_delay_seconds)
        self.wake = asyncio.Event()
        self.leading = False
        self.awaited: dict[uuid.UUID, tuple[uuid.UUID, float]] = {}
        """Node events seen on NATS, not yet caught up with: event id → (node, seen at)."""
        self._log_generation = 0
        self.memory: dict[uuid.UUID, ScaleMemory] = {}
        self.launches: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._launching_clusters: set[str] = set()
        self.terminations: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.cooling: dict[tuple[str, bool], float] = {}
        """(deployment region, spot) → monotonic time until which it is skipped."""
        self.backoff = LaunchBackoff(base=settings.launch_retry_seconds,
                                     cap=settings.launch_retry_max_seconds)
        self.unhealthy_since: dict[uuid.UUID, datetime] = {}
        self.outage_since: dict[uuid.UUID, datetime] = {}
        self.alerted: set[uuid.UUID] = set()
        self._launch_slots = asyncio.Semaphore(settings.max_concurrent_launches)
        self._last_cloud_check = 0.0
        self._waiting_logged: set[uuid.UUID] = set()
        self._held_logged: dict[uuid.UUID, int] = {}
        self.ticks = 0

    # ------------------------------------------------------------------ the loop

    async def lead(self) -> None:
        """The leader's work, until cancelled (stepping down cancels what is in flight; the
        next leader picks it up from the log)."""
        self.metrics.leader.set(1)
        self.leading = True
        self._last_cloud_check = 0.0
        if self.credentials is not None:
            self.credentials.forget_state()
        try:
            while True:
                try:
                    await self._catch_up_awaited()
                    await self.tick()
                except (OSError, asyncpg.PostgresError, aioredis.RedisError) as exc:
                    log.warning("tick failed; next one retries", error=str(exc))
                if self.credentials is not None:
                    # Apart from the tick: a failed tick must not hold back revocations, and
                    # revocations (NATS's business) must never hold back launches.
                    try:
                        await self.credentials.sync()
                    except (OSError, asyncpg.PostgresError) as exc:
                        log.warning("revocations not synced; next tick retries",
                                    error=str(exc) or type(exc).__name__)
                await self._pause()
        finally:
            self.leading = False
            self.awaited.clear()
            self.metrics.leader.set(0)
            self.metrics.forget_deployments()  # the next leader's to say; ours would go stale
            await stop_tasks([*self.launches.values(), *self.terminations.values()])
            self.launches.clear()
            self._launching_clusters.clear()
            self.terminations.clear()

    def observe(self, event: Event) -> None:
        """A node or deployment event seen on NATS: wake the leader, and have it bring the
        node's row up to date once the event is in the log."""
        node = getattr(event, "node_id", None)
        if self.leading and isinstance(node, uuid.UUID):
            self.awaited[event.id] = (node, time.monotonic())
        self.wake.set()

    async def _catch_up_awaited(self) -> None:
        if self.waker is not None:
            self._log_generation = self.waker.generation  # before the read: nothing missed
        if not self.awaited:
            return
        recorded = {r["event_id"] for r in await self.eventlog.pool.fetch(
            "SELECT event_id FROM events WHERE event_id = ANY($1::uuid[])", list(self.awaited))}
        nodes = {self.awaited.pop(e)[0] for e in recorded}
        for node in nodes:
            await self.fleet.catch_up(node)
        too_old = time.monotonic() - AWAIT_RECORDING
        for e in [e for e, (_, seen) in self.awaited.items() if seen < too_old]:
            del self.awaited[e]

    async def _pause(self) -> None:
        """Until the next tick is due: a wake-up, the log growing while node events are
        awaited in it, or the reconcile interval."""
        timeout = self.settings.reconcile_every_seconds
        if self.awaited and self.waker is not None:
            waits = {asyncio.ensure_future(wait_event(self.wake, timeout)),
                     asyncio.ensure_future(self.waker.wait(
                         self._log_generation, min(timeout, self.waker.poll_interval)))}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        else:
            await wait_event(self.wake, timeout)
        self.wake.clear()

    async def tick(self) -> None:
        now = datetime.now(UTC)
        mono = time.monotonic()
        self.ticks += 1
        deployments = await self._deployments()
        nodes = await self.fleet.nodes(statuses=LIVE)
        if mono - self._last_cloud_check >= self.settings.cloud_check_every_seconds:
            self._last_cloud_check = mono
            failed = await self._check_cloud(nodes)
            nodes = [replace(n, status=NodeStatus.FAILED) if n.id in failed else n
                     for n in nodes]
        self._track_unhealthy(nodes, now)
        loads = await self._loads(nodes)
        situation = Situation(
            now=now, unhealthy_grace=timedelta(seconds=self.settings.unhealthy_grace_seconds),
            unhealthy_since=dict(self.unhealthy_since),
            terminating=frozenset(self.terminations),
            cooling=frozenset(k for k, until in self.cooling.items() if until > mono),
            replace_at_once=self.settings.replace_at_once_fraction,
            activation_deadline=timedelta(seconds=self.settings.activation_deadline_seconds))
        by_deployment: dict[uuid.UUID | None, list[NodeView]] = {}
        for n in nodes:
            by_deployment.setdefault(n.deployment_id, []).append(n)
        known = {d.id for d in deployments}
        self.backoff.forget(known)
        self.metrics.forget_deployments(keep={str(d) for d in known})
        for dep in deployments:
            blocked = self.backoff.blocked(dep.id, mono)
            await self._reconcile(dep, by_deployment.get(dep.id, []), loads,
                                  replace(situation, cooling=situation.cooling | blocked)
                                  if blocked else situation, mono)
        # Nodes no deployment owns (started by hand) still go when an operator says so.
        for dep_id, group in by_deployment.items():
            if dep_id in known:
                continue
            for n in group:
                if n.terminate_requested_at is not None and n.id not in self.terminations:
                    self._start_termination(n, Terminate(
                        n.id, n.terminate_reason or "termination requested",
                        n.status != NodeStatus.FAILED))

    async def _deployments(self) -> list[DeploymentSpec]:
        rows = await self.eventlog.pool.fetch(
            """SELECT d.id, d.model_name, d.regions, d.gpu_type, d.spot, d.min_nodes,
                      d.max_nodes, d.allow_on_demand_fallback, d.status, m.weights_source
               FROM deployments d LEFT JOIN models m ON m.id = d.model_id
               WHERE d.status <> 'deleted'
                  OR d.id IN (SELECT deployment_id FROM nodes
                              WHERE status NOT IN ('terminated', 'failed'))""")
        specs = []
        for r in rows:
            serving = r["status"] == "active"
            specs.append(DeploymentSpec(
                id=r["id"], model_name=r["model_name"], regions=tuple(r["regions"]),
                gpu_type=r["gpu_type"], spot=r["spot"],
                min_nodes=r["min_nodes"] if serving else 0,
                max_nodes=r["max_nodes"] if serving else 0,
                allow_on_demand_fallback=r["allow_on_demand_fallback"],
                weights_source=r["weights_source"]))
        return specs

    async def _reconcile(self, dep: DeploymentSpec, nodes: list[NodeView],
                         loads: dict[uuid.UUID, NodeLoad], situation: Situation,
                         mono: float) -> None:
        active = [n for n in nodes if n.status == NodeStatus.ACTIVE]
        pending = sum(1 for n in nodes if n.status in (NodeStatus.LAUNCHING,
                                                       NodeStatus.REGISTERED))
        decision = decide_scale(
            min_nodes=dep.min_nodes, max_nodes=dep.max_nodes, serving=len(active),
            loads=[loads[n.id] for n in active if n.id in loads], pending=pending,
            memory=self.memory.get(dep.id, ScaleMemory()), now=mono, policy=self.policy)
        self.memory[dep.id] = decision.memory
        if decision.reason:
            log.info("scaling", deployment_id=str(dep.id), desired=decision.desired,
                     reason=decision.reason)
        label = str(dep.id)
        self.metrics.desired.labels(label).set(decision.desired)
        self.metrics.active.labels(label).set(len(active))
        plan = plan_deployment(dep, nodes, decision.desired, situation)
        self.metrics.held.labels(label).set(len(plan.held))
        if plan.held and self._held_logged.get(dep.id) != len(plan.held):
            log.warning("replacing lost nodes a few at a time; the rest wait",
                        deployment_id=str(dep.id), held=len(plan.held))
        self._held_logged[dep.id] = len(plan.held)
        await self._execute(dep, nodes, plan)
        await self._watch_outage(dep, len(active), situation.now)

    async def _execute(self, dep: DeploymentSpec, nodes: list[NodeView], plan: Plan) -> None:
        by_id = {n.id: n for n in nodes}
        for f in plan.failures:
            if await self.fleet.signal(f.node_id, Signal.CLOUD_LOST, reason=f.reason):
                self.metrics.launch_failures.labels("deadline").inc()
                log.warning("launch failed", node_id=str(f.node_id), reason=f.reason)
        for launch in plan.launches:
            await self._launch(dep, launch)
        for t in plan.terminations:
            node = by_id[t.node_id]
            if node.terminate_requested_at is None and node.status not in FINAL:
                await self.fleet.request_termination(node.id, t.reason)
            self._start_termination(node, t)
        if plan.waiting_for_capacity:
            if dep.id not in self._waiting_logged:
                self._waiting_logged.add(dep.id)
                log.warning("no capacity in any region; waiting", deployment_id=str(dep.id))
        else:
            self._waiting_logged.discard(dep.id)

    # ------------------------------------------------------------------ observations

    async def _check_cloud(self, nodes: list[NodeView]) -> set[uuid.UUID]:
        """The third safety signal: fail nodes whose machine is gone; end orphan machines.
        An answer that has most of the fleet gone at once is doubted, not acted on
        (safety.believable_cloud_losses): the heartbeats tell whether it was true."""
        try:
            clusters = await self.launcher.clusters()
        except LaunchError as exc:
            log.warning("cloud status unavailable", error=str(exc))
            return set()
        view = cloud_view(nodes, clusters, self.launches.keys(), self._launching_clusters)
        if not believable_cloud_losses(view.checked, len(view.missing),
                                       max_fraction=self.settings.cloud_lost_max_fraction):
            self.metrics.cloud_doubted.inc()
            log.error("the cloud says most of the fleet is gone at once; not believed "
                      "(the nodes' heartbeats will tell): check the launcher's credentials "
                      "and user", missing=len(view.missing), checked=view.checked,
                      clusters_seen=len(clusters))
            return set()
        failed: set[uuid.UUID] = set()
        for n, reason in view.missing:
            after = await self.fleet.signal(n.id, Signal.CLOUD_LOST, reason=reason)
            if after is not None:
                log.warning("node lost by the cloud", node_id=str(n.id),
                            cluster=n.cluster_name, status=after.value)
                self.metrics.cloud_lost.inc()
            if after == NodeStatus.FAILED:
                failed.add(n.id)
        for name in sorted(view.orphans):
            log.info("tearing down a machine no live node owns", cluster=name)
            with contextlib.suppress(LaunchError):
                await self.launcher.down(name)
        return failed

    def _track_unhealthy(self, nodes: list[NodeView], now: datetime) -> None:
        unhealthy = {n.id for n in nodes if n.status == NodeStatus.UNHEALTHY}
        for node_id in list(self.unhealthy_since):
            if node_id not in unhealthy:
                del self.unhealthy_since[node_id]
        for node_id in unhealthy:
            self.unhealthy_since.setdefault(node_id, now)

    async def _loads(self, nodes: list[NodeView]) -> dict[uuid.UUID, NodeLoad]:
        active = [n.id for n in nodes if n.status == NodeStatus.ACTIVE]
        if not active:
            return {}
        loads: dict[uuid.UUID, NodeLoad] = {}
        for node_id, (hb, _) in zip(active, await latest_heartbeats(self.redis, active),
                                    strict=True):
            if hb is not None:
                loads[node_id] = NodeLoad(waiting=hb.num_requests_waiting or 0.0,
                                          running=hb.num_requests_running or 0.0,
                                          kv_cache_usage=hb.kv_cache_usage or 0.0)
        return loads

    async def _watch_outage(self, dep: DeploymentSpec, active: int, now: datetime) -> None:
        """`deployment.no_active_nodes`, once per outage, when one that should serve has had
        no active node for `no_active_alert_after_seconds`."""
        if active > 0 or dep.min_nodes == 0:
            self.outage_since.pop(dep.id, None)
            self.alerted.discard(dep.id)
            return
        since = self.outage_since.setdefault(dep.id, now)
        if dep.id in self.alerted or \
                (now - since).total_seconds() < self.settings.no_active_alert_after_seconds:
            return
        self.alerted.add(dep.id)
        event = DeploymentNoActiveNodes(deployment_id=dep.id, model_name=dep.model_name,
                                        since=since, metadata=EventMetadata(actor="orchestrator"))
        await self.eventlog.append(event.stream, [event], ANY)
        log.error("deployment has no active node", deployment_id=str(dep.id),
                  model=dep.model_name, since=since.isoformat())
