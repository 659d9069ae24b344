"""The monitor's settings, read once from the environment."""

from __future__ import annotations

from services.core.settings import CoreSettings


class MonitorSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "monitor"
    http_port: int = 8082
    heartbeat_ttl_seconds: int = 300
    """How long Redis keeps a node's last heartbeat once it stops coming."""
