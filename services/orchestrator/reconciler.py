"""What a deployment needs done now: which nodes to launch (where, spot or not), which to
terminate, which launches have failed. Pure: the orchestrator feeds it the deployment, its
nodes as the fleet knows them, the desired count and the clock, and executes the plan.

Rules:
- Capacity is every node launching (before its deadline), registered or active, plus the
  unhealthy ones still within their grace — minus those being terminated.
- Lost nodes (stale, failed, unhealthy past the grace, draining without us asking — a spot
  notice) are replaced at once: the shortfall they leave is launched now, and the launches are
  attributed to them (node.replaced), then they are terminated. We never wait for the old one
  to die before starting the new one.
- A launch that has not registered by its deadline has failed; so has a node that registered
  but has not become active within `activation_deadline` of its registration (vLLM never came
  up): otherwise it would count as capacity for ever and block the launch that replaces it.
- Suspect losses — stale (silent) or unhealthy past the grace: the node may well come back,
  and a fleet going silent all at once says more about the watcher than the nodes — are
  replaced a few at a time: at most `replace_at_once` of the deployment's target (at least
  one) are on their way out or being launched at once; the others are held (counted as
  capacity, neither terminated nor replaced) until that work is done. Failed nodes (the cloud
  says the machine is gone) and draining ones (a spot notice) are replaced at once.
- Above the desired count, the surplus goes: launches not yet registered first, then
  unhealthy, then registered but not yet serving, then the most recently started.
- Launches go to the deployment's region with the fewest nodes among those not cooling down
  after a capacity error; when no spot capacity is to be had and the deployment allows it,
  on-demand.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas.events import NodeStatus
from services.domain.fleet import NodeView


@dataclass(frozen=True)
class DeploymentSpec:
    id: uuid.UUID
    model_name: str
    regions: tuple[str, ...]
    gpu_type: str
    spot: bool
    min_nodes: int
    max_nodes: int
    allow_on_demand_fallback: bool = True
    weights_source: str | None = None
    """The model's, as the catalog holds it (canonical); None: the Hub repo of its name."""


@dataclass(frozen=True)
class Launch:
    region: str
    spot: bool
    reason: str
    replaces: uuid.UUID | None = None


@dataclass(frozen=True)
class Terminate:
    node_id: uuid.UUID
    reason: str
    drain: bool
    """Ask the agent to finish in-flight requests first (a node that can still talk)."""


@dataclass(frozen=True)
class Fail:
    node_id: uuid.UUID
    reason: str


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    terminations: list[Terminate] = field(default_factory=list)
    failures: list[Fail] = field(default_factory=list)
    waiting_for_capacity: bool = False
    """Launches were needed but every region is cooling down."""
    held: list[uuid.UUID] = field(default_factory=list)
    """Suspect losses left alone this time: too many are being replaced already."""


@dataclass(frozen=True)
class Situation:
    now: datetime
    unhealthy_grace: timedelta
    unhealthy_since: dict[uuid.UUID, datetime] = field(default_factory=dict)
    terminating: frozenset[uuid.UUID] = frozenset()
    """Nodes whose termination is under way (left alone)."""
    cooling: frozenset[tuple[str, bool]] = frozenset()
    """(region, spot) pairs that refused a launch recently."""
    activation_deadline: timedelta = timedelta(minutes=20)
    """How long a registered node has to become active (download the weights, load them)."""
    replace_at_once: float = 1.0
    """Fraction of a deployment's target (at least one node) that may be replaced for a
    suspect loss at a time."""


_CAPACITY = frozenset({NodeStatus.LAUNCHING, NodeStatus.REGISTERED, NodeStatus.ACTIVE})
_LOST = frozenset({NodeStatus.STALE, NodeStatus.FAILED, NodeStatus.DRAINING})
_DONE = frozenset({NodeStatus.TERMINATED})
_SUSPECT = frozenset({NodeStatus.STALE, NodeStatus.UNHEALTHY})
_ON_THE_WAY = frozenset({NodeStatus.LAUNCHING, NodeStatus.REGISTERED})


def replacement_budget(target: int, fraction: float, in_progress: int) -> int:
    """How many more suspect losses may be replaced now: `fraction` of the target, at least
    one, minus the replacements (or launches) already under way."""
    return max(0, max(1, int(target * fraction)) - in_progress)


def _surplus_order(node: NodeView) -> tuple[int, float]:
    rank = {NodeStatus.LAUNCHING: 0, NodeStatus.UNHEALTHY: 1, NodeStatus.REGISTERED: 2,
            NodeStatus.ACTIVE: 3}.get(node.status, 4)
    return rank, -node.registered_at.timestamp()


def plan_deployment(dep: DeploymentSpec, nodes: list[NodeView], desired: int,
                    s: Situation) -> Plan:
    plan = Plan()
    capacity: list[NodeView] = []
    lost: list[NodeView] = []
    in_progress = 0
    """Suspect losses being terminated, and launches not serving yet."""
    for node in nodes:
        if node.status in _SUSPECT and node.id in s.terminating:
            in_progress += 1
        if node.status in _DONE or node.id in s.terminating:
            continue
        if node.terminate_requested_at is not None:
            drain = node.status not in (NodeStatus.FAILED, NodeStatus.STALE,
                                        NodeStatus.LAUNCHING)
            plan.terminations.append(Terminate(
                node.id, node.terminate_reason or "termination requested", drain))
            continue
        if node.status == NodeStatus.LAUNCHING and node.launch_deadline is not None \
                and s.now >= node.launch_deadline:
            plan.failures.append(Fail(node.id, "did not register before its deadline"))
            lost.append(node)
            continue
        if node.status == NodeStatus.REGISTERED and node.status_since is not None \
                and s.now - node.status_since >= s.activation_deadline:
            plan.failures.append(Fail(node.id, "registered but did not become active within "
                                      f"{s.activation_deadline.total_seconds():.0f}s"))
            lost.append(node)
            continue
        if node.status in _CAPACITY:
            capacity.append(node)
            if node.status in _ON_THE_WAY:
                in_progress += 1
        elif node.status == NodeStatus.UNHEALTHY:
            since = s.unhealthy_since.get(node.id, s.now)
            if s.now - since < s.unhealthy_grace:
                capacity.append(node)
            else:
                lost.append(node)
        elif node.status in _LOST:
            lost.append(node)

    target = max(dep.min_nodes, min(dep.max_nodes, desired))
    budget = replacement_budget(target, s.replace_at_once, in_progress)
    held: list[NodeView] = []
    for node in sorted((n for n in lost if n.status in _SUSPECT),
                       key=lambda n: (n.registered_at, n.id.int)):
        if budget > 0:
            budget -= 1
        else:
            held.append(node)
    plan.held = [n.id for n in held]
    lost = [n for n in lost if n not in held]
    for node in lost:
        if node.status == NodeStatus.DRAINING:
            reason, drain = "draining (spot notice or drain)", True
        elif node.status == NodeStatus.UNHEALTHY:
            reason, drain = "unhealthy past its grace", True
        else:
            reason, drain = node.status.value, False
        plan.terminations.append(Terminate(node.id, f"lost: {reason}", drain))

    if len(capacity) > target:
        for node in sorted(capacity, key=_surplus_order)[:len(capacity) - target]:
            plan.terminations.append(Terminate(
                node.id, "scale down", node.status != NodeStatus.LAUNCHING))
            capacity.remove(node)

    shortfall = target - len(capacity) - len(held)
    to_replace = [n.id for n in lost]
    per_region = {r: sum(1 for n in capacity if n.region == bare_region(r))
                  for r in dep.regions}
    for i in range(max(0, shortfall)):
        choice = _where(dep, per_region, s.cooling)
        if choice is None:
            plan.waiting_for_capacity = True
            break
        region, spot = choice
        per_region[region] = per_region.get(region, 0) + 1
        replaces = to_replace[i] if i < len(to_replace) else None
        plan.launches.append(Launch(region, spot, "replacement" if replaces else
                                    f"below desired ({len(capacity)} of {target})", replaces))
    return plan


def bare_region(region: str) -> str:
    """A deployment names regions with their cloud ('aws/us-east-1'); nodes without it."""
    return region.rpartition("/")[2]


def _where(dep: DeploymentSpec, per_region: dict[str, int],
           cooling: frozenset[tuple[str, bool]]) -> tuple[str, bool] | None:
    """The least-loaded region that can take a launch: spot first when the deployment is spot,
    then on-demand if it allows the fallback."""
    options = [dep.spot] + ([False] if dep.spot and dep.allow_on_demand_fallback else [])
    for spot in options:
        open_regions = [r for r in dep.regions if (r, spot) not in cooling]
        if open_regions:
            return min(open_regions, key=lambda r: (per_region.get(r, 0),
                                                    dep.regions.index(r))), spot
    return None
