"""The fleet: GPU nodes as the control plane knows them (the `nodes` projection) and the
commands that change them, shared by the monitor, the orchestrator and the admin API."""

from services.domain.fleet.commands import Fleet, NodeView, UnknownNode
from services.domain.fleet.lock import NODE_LOCK_CLASS, lock_node
from services.domain.fleet.projection import NodesProjection

__all__ = ["NODE_LOCK_CLASS", "Fleet", "NodeView", "NodesProjection", "UnknownNode", "lock_node"]
