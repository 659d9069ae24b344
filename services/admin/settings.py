"""The admin service's settings, read once from the environment."""

from __future__ import annotations

from services.core.settings import CoreSettings, Secret, SettingsError


class AdminSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "admin"
    http_port: int = 8081
    admin_token: Secret = Secret("")
    """Callers send it as ``X-Admin-Token``. Required: the service refuses to start without."""
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
    if not settings.admin_token.reveal().strip():
        raise SettingsError("ADMIN_TOKEN is empty: the admin API refuses to start without a "
                            "token (set ADMIN_TOKEN to a long random string; callers send it "
                            "as X-Admin-Token)")
    if settings.max_body_bytes <= 0:
        raise SettingsError("MAX_BODY_BYTES must be positive")
    if settings.event_stream_keepalive <= 0:
        raise SettingsError("EVENT_STREAM_KEEPALIVE must be positive")
