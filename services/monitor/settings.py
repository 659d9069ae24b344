"""The monitor's settings, read once from the environment."""

from __future__ import annotations

from services.infra.settings import CoreSettings


class MonitorSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "monitor"
    http_port: int = 8082
    heartbeat_ttl_seconds: int = 300
    """How long Redis keeps a node's last heartbeat once it stops coming."""
    health_score_threshold: int = 50
    """Below it a node is unhealthy (the gateway uses the same default)."""
    stale_after_seconds: float = 60.0
    sweep_every_seconds: float = 1.0
    probe_every_seconds: float = 10.0
    probe_timeout_seconds: float = 2.0
    probe_failures: int = 3
    gauges_every_seconds: float = 5.0
    """How often the fleet gauges and node_heartbeat_age_seconds are refreshed."""
    leader_retry_seconds: float = 2.0
    blind_after_seconds: float = 10.0
    """No sweep for this long (every monitor down, a slow failover) and the monitor counts
    itself blind: no node is declared stale until it has listened for STALE_AFTER_SECONDS."""
