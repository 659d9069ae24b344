"""Billing's settings, read once from the environment."""

from __future__ import annotations

from services.core.settings import CoreSettings


class BillingSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "billing"
    http_port: int = 8083
    region_multipliers: str = ""
    """Comma-separated region=multiplier pairs, e.g. ``eu-west-1=1.10,ap-south-1=1.25``;
    regions not listed cost 1x."""
    model_refresh_seconds: float = 30.0
