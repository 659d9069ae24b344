"""The orchestrator's Prometheus metrics: launches, failures, replacements, terminations,
the cloud checks, and each deployment's desired and active nodes."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from prometheus_client import CollectorRegistry, Counter, Gauge


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.launches = Counter("orchestrator_launches_total", "Nodes launched",
                                ["region", "spot"], registry=registry)
        self.launch_failures = Counter(
            "orchestrator_launch_failures_total",
            "Launches that failed (capacity, error, or no registration by the deadline)",
            ["reason"], registry=registry)
        self.replacements = Counter("orchestrator_replacements_total",
                                    "Lost nodes replaced", registry=registry)
        self.terminations = Counter("orchestrator_terminations_total", "Nodes terminated",
                                    registry=registry)
        self.cloud_lost = Counter("orchestrator_cloud_lost_total",
                                  "Nodes failed because the cloud no longer had their machine",
                                  registry=registry)
        self.cloud_doubted = Counter(
            "orchestrator_cloud_checks_doubted_total",
            "Looks at the cloud not acted on: they had most of the fleet gone at once",
            registry=registry)
        self.desired = Gauge("deployment_desired_nodes", "Nodes a deployment wants now",
                             ["deployment"], registry=registry)
        self.active = Gauge("deployment_active_nodes", "A deployment's active nodes",
                            ["deployment"], registry=registry)
        self.held = Gauge("deployment_replacements_held",
                          "Lost nodes (stale, unhealthy) waiting to be replaced because "
                          "enough of the deployment is being replaced already",
                          ["deployment"], registry=registry)
        self.leader = Gauge("orchestrator_is_leader", "1 on the replica that leads",
                            registry=registry)

    def forget_deployments(self, keep: AbstractSet[str] = frozenset()) -> None:
        """Drop the per-deployment series of deployments not in `keep`: those that are gone,
        or all of them when this replica stops leading (a standby exports none)."""
        for gauge in (self.desired, self.active, self.held):
            for (label,) in [k for k in _labels(gauge) if k[0] not in keep]:
                gauge.remove(label)


def _labels(gauge: Gauge) -> list[tuple[str, ...]]:
    return [tuple(s.labels.values()) for m in gauge.collect() for s in m.samples]
