"""Projection `nodes`: one row per GPU node, from its lifecycle events (not heartbeats).

Events the control plane appends (status changes, launches, terminations) went through the
state machine (services/domain/node_states.py) before they were appended. Events the agents
publish did not: a registration, a spot notice or a drain can reach the log after the node's
end (a late or redelivered message). So here too, terminated and failed are final: such an
event moves the row's version on and changes nothing else. And a draining node never serves
again: an agent that restarts and registers while draining stays draining.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas.events import (
    NodeDeregistered,
    NodeDraining,
    NodeLaunching,
    NodeRegistered,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
    NodeTerminateRequested,
)
from services.infra.db import Connection
from services.infra.log_records import RecordedEvent
from services.infra.projections import Projection

_FINAL = "('terminated', 'failed')"

# An agent's word on a node that has ended changes nothing but the row's version.
# `status_since` moves only when the status does.
_STATUS_UPDATE = f"""
UPDATE nodes SET
    status_since = CASE WHEN status IN {_FINAL} OR status = $2 THEN status_since ELSE $4 END,
    status = CASE WHEN status IN {_FINAL} THEN status ELSE $2 END,
    status_reason = CASE WHEN status IN {_FINAL} THEN status_reason ELSE $3 END,
    updated_at = CASE WHEN status IN {_FINAL} THEN updated_at ELSE $4 END,
    version = $5
WHERE id = $1 AND version < $5
"""


class NodesProjection(Projection):
    name = "nodes"
    tables = ("nodes",)
    event_types = ("node.*",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            if r.type == "node.heartbeat":
                continue
            e = r.event
            v = r.stream_version
            if isinstance(e, NodeLaunching):
                await conn.execute(
                    """INSERT INTO nodes (id, cluster_name, provider, region, gpu_type,
                           model_name, spot_instance, status, deployment_id, launch_deadline,
                           registered_at, updated_at, status_since, version, credential_key,
                           credential_expires_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, 'launching', $8, $9, $10, $10, $10,
                               $11, $12, $13)
                       ON CONFLICT (id) DO NOTHING""",
                    e.node_id, e.cluster_name, e.provider, e.region, e.gpu_type, e.model_name,
                    e.spot, e.deployment_id, e.deadline, e.occurred_at, v,
                    e.credential_key, e.credential_expires_at)
            elif isinstance(e, NodeTerminateRequested):
                await conn.execute(
                    """UPDATE nodes SET terminate_requested_at = $2, terminate_reason = $3,
                           updated_at = $2, version = $4
                       WHERE id = $1 AND version < $4""",
                    e.node_id, e.occurred_at, e.reason, v)
            elif isinstance(e, NodeRegistered):
                # A node that registers again (agent restarted) is registered anew — unless it
                # has ended (the version moves on, nothing else) or is draining (it stays so).
                # What its launch (or first registration) said stands: the agent's word adds
                # only what the agent alone knows. Its cluster name above all: the orchestrator
                # tears down the cluster the row names, and a leaked node credential must not
                # be able to name another node's.
                await conn.execute(
                    "UPDATE nodes SET version = $2 WHERE id = $1 AND version < $2 "
                    f"AND status IN {_FINAL}", e.node_id, v)
                await conn.execute(
                    """INSERT INTO nodes (id, cluster_name, provider, region, instance_type,
                           gpu_type, vram_total_gb, model_name, endpoint_url, spot_instance,
                           agent_version, status, registered_at, updated_at, status_since,
                           version)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'registered',
                               $12, $12, $12, $13)
                       ON CONFLICT (id) DO UPDATE SET
                           instance_type = EXCLUDED.instance_type,
                           vram_total_gb = EXCLUDED.vram_total_gb,
                           endpoint_url = EXCLUDED.endpoint_url,
                           agent_version = EXCLUDED.agent_version,
                           status_since = CASE WHEN nodes.status IN ('draining', 'registered')
                                               THEN nodes.status_since
                                               ELSE EXCLUDED.status_since END,
                           status = CASE WHEN nodes.status = 'draining' THEN 'draining'
                                         ELSE 'registered' END,
                           status_reason = CASE WHEN nodes.status = 'draining'
                                                THEN nodes.status_reason ELSE '' END,
                           updated_at = EXCLUDED.updated_at, version = EXCLUDED.version
                       WHERE nodes.version < EXCLUDED.version""",
                    e.node_id, e.cluster_name, e.provider, e.region, e.instance_type,
                    e.gpu_type, e.vram_total_gb, e.model_name, e.endpoint_url,
                    e.spot_instance, e.agent_version, e.occurred_at, v)
            elif isinstance(e, NodeStatusChanged):
                await conn.execute(
                    """UPDATE nodes SET status = $2, status_reason = $3,
                           status_since = CASE WHEN status = $2 THEN status_since ELSE $5 END,
                           health_score = coalesce($4, health_score), updated_at = $5,
                           version = $6
                       WHERE id = $1 AND version < $6""",
                    e.node_id, e.to_status.value, e.reason, e.health_score, e.occurred_at, v)
            elif isinstance(e, NodeSpotWarning):
                await conn.execute(
                    f"""UPDATE nodes SET spot_deadline = CASE WHEN status IN {_FINAL}
                                                        THEN spot_deadline ELSE $2 END
                        WHERE id = $1 AND version < $3""", e.node_id, e.deadline, v)
                await conn.execute(_STATUS_UPDATE, e.node_id, NodeStatus.DRAINING.value,
                                   f"spot {e.action}", e.occurred_at, v)
            elif isinstance(e, NodeDraining):
                await conn.execute(_STATUS_UPDATE, e.node_id, NodeStatus.DRAINING.value,
                                   e.reason, e.occurred_at, v)
            elif isinstance(e, NodeDeregistered | NodeTerminated):
                await conn.execute(_STATUS_UPDATE, e.node_id, NodeStatus.TERMINATED.value,
                                   e.reason, e.occurred_at, v)
