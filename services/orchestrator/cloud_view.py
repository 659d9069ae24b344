"""What the cloud's answer says about the fleet (the orchestrator's third safety signal).
Pure: the cloud's clusters in, the nodes whose machine is gone and the machines no live node
owns out; the orchestrator acts on them (safety.believable_cloud_losses first)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from schemas.events import NodeStatus
from services.domain.fleet import NodeView
from services.orchestrator.launcher import ClusterState


@dataclass(frozen=True)
class CloudView:
    checked: int = 0
    """Nodes whose machine the cloud should have: a deployment's, launched and up."""
    missing: list[tuple[NodeView, str]] = field(default_factory=list)
    """Of those, the ones whose machine is stopped or gone, with why."""
    orphans: set[str] = field(default_factory=set)
    """Clusters the cloud has that no live node of a deployment owns (nor a launch)."""


def cloud_view(nodes: Iterable[NodeView], clusters: Mapping[str, ClusterState],
               launching: AbstractSet[object], launching_clusters: AbstractSet[str]
               ) -> CloudView:
    """`nodes`: the live nodes; `launching`: ids of nodes being launched now (not up yet:
    their launch deadline watches them); `launching_clusters`: the clusters those launches
    asked for."""
    owned: set[str] = set()
    checked = 0
    missing: list[tuple[NodeView, str]] = []
    for n in nodes:
        if n.deployment_id is None:
            continue  # not the orchestrator's
        owned.add(n.cluster_name)
        if n.status == NodeStatus.LAUNCHING or n.id in launching:
            continue
        checked += 1
        state = clusters.get(n.cluster_name)
        if state in (ClusterState.UP, ClusterState.STARTING):
            continue
        missing.append((n, "the cloud stopped its machine" if state == ClusterState.STOPPED
                        else "the cloud no longer has its machine"))
    return CloudView(checked, missing, set(clusters) - owned - set(launching_clusters))
