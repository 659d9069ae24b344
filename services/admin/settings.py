"""The admin service's settings, read once from the environment."""

from __future__ import annotations

from decimal import Decimal

from services.domain.cost_meter import DEFAULT_UNIT, parse_unit
from services.infra.settings import CoreSettings, Secret, SettingsError, require_strong_token


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
    made, only the customer. Both are the old way: once `crosslogic billing setup` has made
    the cost price, new links subscribe to it instead."""
    stripe_meter_cost_event: str = "crosslogic_cost"
    """`event_name` of the cost meter (billing's setting of the same name)."""
    billing_cost_unit: str = str(DEFAULT_UNIT)
    """The cost meter's unit (billing's setting of the same name): its price is one unit."""
    billing_currency: str = "usd"
    """Currency of the cost price: the catalog's prices are in it."""
    settle_timeout: float = 60.0
    """Seconds the admin API waits for billing's pusher leader to settle a held export (a
    resend waits on Stripe: billing's STRIPE_TIMEOUT, 30 s by default)."""

    @property
    def cost_unit(self) -> Decimal:
        return parse_unit(self.billing_cost_unit)


def check_settings(settings: AdminSettings) -> None:
    """What `load_settings` cannot say by types alone; SettingsError names the variable."""
    require_strong_token("ADMIN_TOKEN", settings.admin_token,
                         "it opens the whole admin API; callers send it as X-Admin-Token")
    if settings.max_body_bytes <= 0:
        raise SettingsError("MAX_BODY_BYTES must be positive")
    if not 0 < settings.settle_timeout <= 110:
        # Under the reply window billing's NATS identity has (SETTLE_REPLY_SECONDS).
        raise SettingsError("SETTLE_TIMEOUT must be between 0 and 110 seconds")
    if settings.event_stream_keepalive <= 0:
        raise SettingsError("EVENT_STREAM_KEEPALIVE must be positive")
    try:
        parse_unit(settings.billing_cost_unit)
    except ValueError as exc:
        raise SettingsError(f"BILLING_COST_UNIT {exc}") from None
    if not settings.billing_currency.isalpha() or len(settings.billing_currency) != 3:
        raise SettingsError("BILLING_CURRENCY must be a three-letter ISO currency code")
    if not 0 < len(settings.stripe_meter_cost_event) <= 100:
        raise SettingsError("STRIPE_METER_COST_EVENT must be 1 to 100 characters")
