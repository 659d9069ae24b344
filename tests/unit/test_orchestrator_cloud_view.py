"""The orchestrator's reading of the cloud's answer (issue 18: a decision out of its I/O
loop). Pure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from schemas.events import NodeStatus
from services.domain.fleet import NodeView
from services.orchestrator.cloud_view import cloud_view
from services.orchestrator.launcher import ClusterState

DEPLOYMENT = uuid.UUID(int=7)


def node(cluster: str, status: NodeStatus = NodeStatus.ACTIVE,
         deployment: uuid.UUID | None = DEPLOYMENT) -> NodeView:
    return NodeView(id=uuid.uuid4(), status=status, deployment_id=deployment,
                    cluster_name=cluster, model_name="m", region="r", endpoint_url="",
                    spot_instance=False, launch_deadline=None, terminate_requested_at=None,
                    registered_at=datetime.now(UTC))


def test_machines_gone_or_stopped_are_missing_and_unowned_ones_are_orphans() -> None:
    up, stopped, gone = node("a"), node("b"), node("c")
    view = cloud_view([up, stopped, gone], {"a": ClusterState.UP, "b": ClusterState.STOPPED,
                                            "x": ClusterState.UP}, set(), set())
    assert view.checked == 3
    assert view.missing == [(stopped, "the cloud stopped its machine"),
                            (gone, "the cloud no longer has its machine")]
    assert view.orphans == {"x"}


def test_launches_are_not_judged_and_their_machines_are_not_orphans() -> None:
    launching = node("l", NodeStatus.LAUNCHING)
    being_launched = node("k")
    view = cloud_view([launching, being_launched], {"z": ClusterState.STARTING},
                      {being_launched.id}, {"z"})
    assert (view.checked, view.missing, view.orphans) == (0, [], set())


def test_a_node_of_no_deployment_is_not_the_orchestrators() -> None:
    manual = node("m", deployment=None)
    view = cloud_view([manual], {"m": ClusterState.UP}, set(), set())
    # Neither judged nor owning its machine: the orchestrator tears down only what no live
    # node of a deployment owns, and this machine is one.
    assert (view.checked, view.missing, view.orphans) == (0, [], {"m"})
