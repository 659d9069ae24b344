"""Billing's settings, read once from the environment."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Literal

from services.domain.cost_meter import DEFAULT_UNIT, parse_unit
from services.domain.stripe_billing import StripeConfig
from services.infra.settings import CoreSettings, Secret, SettingsError


class BillingSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "billing"
    http_port: int = 8083
    region_multipliers: str = ""
    """Comma-separated region=multiplier pairs, e.g. ``eu-west-1=1.10,ap-south-1=1.25``;
    regions not listed cost 1x."""
    model_refresh_seconds: float = 30.0
    usage_recorder_workers: int = 2
    """Concurrent fetchers on the usage consumer (throughput; order does not matter)."""
    billing_max_tokens_per_record: int = 10_000_000
    """Usage records carrying more tokens (prompt + completion) are refused (dead letters):
    no request is that large; a record that says so is a lie or a bug."""

    # Stripe. Without a secret key usage is still recorded; nothing is pushed.
    stripe_secret_key: Secret = Secret("")
    stripe_webhook_secret: Secret = Secret("")
    """``whsec_…``: without it POST /webhooks/stripe answers 503."""
    stripe_api_base: str = ""
    """Another Stripe-compatible server; empty: api.stripe.com."""
    stripe_timeout: float = 30.0
    stripe_meter_input_event: str = "crosslogic_input_tokens"
    """`event_name` of the Stripe meter for prompt tokens (empty: not exported)."""
    stripe_meter_output_event: str = "crosslogic_output_tokens"
    """`event_name` of the Stripe meter for completion tokens (empty: not exported)."""
    stripe_meter_cost_event: str = "crosslogic_cost"
    """`event_name` of the Stripe meter for the cost of tenants on the cost price (empty: not
    exported)."""
    billing_cost_unit: str = str(DEFAULT_UNIT)
    """What one unit of the cost meter is worth, in the currency: a power of ten from
    0.000000001 (the default, the precision of every record's cost: nothing is rounded before
    Stripe's invoice) to 0.01. The admin service must have the same (its price is one unit)."""
    stripe_webhook_tolerance: int = 300
    """Seconds a webhook's signed timestamp may be old."""

    budget_watch_seconds: float = 30.0
    """Seconds between looks at every spend budget's period, for its 50/80/100% alerts."""
    billing_hour_grace: float = 300.0
    """Seconds after an hour ends before it is closed and pushed; later usage is a
    correction."""
    billing_backdate_window: float = 2700.0
    """Seconds after an hour ends during which its meter events carry the hour's start; later
    (late usage, a backlog) they carry the time of sending, so that usage is never aimed at a
    billing period whose invoice Stripe has finalized. Keep it under your invoices'
    finalization grace period (Stripe's default: 1 h)."""
    billing_push_interval: float = 30.0
    billing_full_scan_interval: float = 900.0
    """Seconds between plans that look at every hour of the look-back; the passes between
    look only at hours whose usage changed, that just closed, or were skipped for a tenant
    linked since. The full ones catch what no change marks (usage recovered by rebuilding
    usage_records)."""
    billing_push_lookback_days: int = 45
    """Hours older than this are not looked at again (late usage for them is not pushed)."""
    billing_push_concurrency: int = 4
    """Customers sent to at once (each customer and meter: one call at a time)."""
    billing_push_attempts: int = 5
    """Tries per meter event and pass for retryable errors (429, 5xx, network)."""
    billing_retry_initial: float = 0.5
    billing_retry_max: float = 30.0
    billing_resend_horizon: float = 72000.0
    """Seconds (20 h) after planning past which a meter event that may have reached Stripe
    already (a timeout, a cut connection, a 5xx, a sender that stopped) is held for an
    operator instead of resent: Stripe keeps identifiers unique for about 24 h only."""
    billing_leader_retry: float = 5.0
    """Seconds between a standby pusher's attempts to take over."""

    payment_failed_policy: Literal["flag", "suspend"] = "flag"
    subscription_deleted_policy: Literal["suspend", "flag"] = "suspend"

    @property
    def stripe(self) -> StripeConfig:
        return StripeConfig(self.stripe_secret_key, self.stripe_api_base, self.stripe_timeout)

    @property
    def hour_grace(self) -> timedelta:
        return timedelta(seconds=self.billing_hour_grace)

    @property
    def resend_horizon(self) -> timedelta:
        return timedelta(seconds=self.billing_resend_horizon)

    @property
    def backdate_window(self) -> timedelta:
        return timedelta(seconds=self.billing_backdate_window)

    @property
    def meter_events(self) -> dict[str, str]:
        return {"input_tokens": self.stripe_meter_input_event.strip(),
                "output_tokens": self.stripe_meter_output_event.strip(),
                "cost": self.stripe_meter_cost_event.strip()}

    @property
    def cost_unit(self) -> Decimal:
        return parse_unit(self.billing_cost_unit)


def check_settings(s: BillingSettings) -> None:
    """What the types cannot say; SettingsError names the variable."""
    positive = {"USAGE_RECORDER_WORKERS": s.usage_recorder_workers,
                "BILLING_MAX_TOKENS_PER_RECORD": s.billing_max_tokens_per_record,
                "BILLING_PUSH_INTERVAL": s.billing_push_interval,
                "BILLING_FULL_SCAN_INTERVAL": s.billing_full_scan_interval,
                "BILLING_PUSH_LOOKBACK_DAYS": s.billing_push_lookback_days,
                "BILLING_PUSH_CONCURRENCY": s.billing_push_concurrency,
                "BILLING_PUSH_ATTEMPTS": s.billing_push_attempts,
                "BILLING_RETRY_INITIAL": s.billing_retry_initial,
                "BILLING_LEADER_RETRY": s.billing_leader_retry,
                "BUDGET_WATCH_SECONDS": s.budget_watch_seconds,
                "BILLING_RESEND_HORIZON": s.billing_resend_horizon,
                "STRIPE_TIMEOUT": s.stripe_timeout,
                "STRIPE_WEBHOOK_TOLERANCE": s.stripe_webhook_tolerance}
    for name, value in positive.items():
        if value <= 0:
            raise SettingsError(f"{name} must be positive")
    if s.billing_hour_grace < 0:
        raise SettingsError("BILLING_HOUR_GRACE cannot be negative")
    if s.billing_backdate_window < 0:
        raise SettingsError("BILLING_BACKDATE_WINDOW cannot be negative")
    if s.billing_retry_max < s.billing_retry_initial:
        raise SettingsError("BILLING_RETRY_MAX must be at least BILLING_RETRY_INITIAL")
    for variable, event_name in (("STRIPE_METER_INPUT_EVENT", s.stripe_meter_input_event),
                                 ("STRIPE_METER_OUTPUT_EVENT", s.stripe_meter_output_event),
                                 ("STRIPE_METER_COST_EVENT", s.stripe_meter_cost_event)):
        if len(event_name) > 100:
            raise SettingsError(f"{variable} is longer than Stripe's 100 characters")
    try:
        parse_unit(s.billing_cost_unit)
    except ValueError as exc:
        raise SettingsError(f"BILLING_COST_UNIT {exc}") from None
