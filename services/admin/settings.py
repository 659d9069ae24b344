"""The admin service's settings, read once from the environment."""

from __future__ import annotations

from services.core.settings import CoreSettings, Secret, SettingsError, require_strong_token


class AdminSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "admin"
    http_port: int = 8081
    admin_token: Secret = Secret("")
    """Callers send it as ``X-Admin-Token``. Required, and strong: the service refuses to
    start when it is empty, a placeholder or shorter than 32 characters."""
    max_body_bytes: int = 1024 * 1024
    event_stream_keepalive: float = 15.0
    """Seconds of silence after which an event stream sends an SSE comment, so proxies and
    clients can tell a quiet log from a dead connection."""
    # Stripe, for linking tenants to customers (POST /tenants/{id}/billing/customer). Optional:
    # without a secret key that route answers 503 and everything else works.
    stripe_secret_key: Secret = Secret("")
    stripe_api_base: str = ""
    """Another Stripe-compatible server; empty: api.stripe.com."""
    stripe_timeout: float = 30.0
    stripe_price_input_tokens: str = ""
    """Metered price (on the input-tokens meter) a linked tenant is subscribed to."""
    stripe_price_output_tokens: str = ""
    """Metered price (on the output-tokens meter); with neither price no subscription is
    made, only the customer."""


def check_settings(settings: AdminSettings) -> None:
    """What `load_settings` cannot say by types alone; SettingsError names the variable."""
    require_strong_token("ADMIN_TOKEN", settings.admin_token,
                         "it opens the whole admin API; callers send it as X-Admin-Token")
    if settings.max_body_bytes <= 0:
        raise SettingsError("MAX_BODY_BYTES must be positive")
    if settings.event_stream_keepalive <= 0:
        raise SettingsError("EVENT_STREAM_KEEPALIVE must be positive")
