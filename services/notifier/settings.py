"""The notifier's settings, read once from the environment."""

from __future__ import annotations

import ipaddress

from services.infra.settings import (
    MAKE_A_TOKEN,
    CoreSettings,
    Secret,
    SettingsError,
    require_strong_token,
)

SVIX_SCHEDULE = "0,5,300,1800,7200,18000,36000,36000"
"""Seconds before each attempt: at once, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (Svix's)."""


class NotifierSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "notifier"
    http_port: int = 8084

    retry_schedule: str = SVIX_SCHEDULE
    """Comma-separated seconds: the delay before the 1st attempt, then after each failure."""
    disable_after_seconds: float = 5 * 86400
    """An endpoint failing continuously (no success) for this long is disabled."""
    max_retry_after_seconds: float = 3600
    """A 429's Retry-After is honoured up to this."""

    min_interval_discord: float = 2.0
    """Seconds between two requests to one endpoint. Discord: 30 messages a minute per
    channel; Slack: about one a second per webhook."""
    min_interval_slack: float = 1.0
    min_interval_email: float = 1.0
    min_interval_generic: float = 0.1

    http_timeout_seconds: float = 10.0
    lease_seconds: float = 60.0
    """How long a replica owns a delivery it is sending (more than the longest attempt);
    a crashed replica's deliveries are picked up again after it."""
    concurrency: int = 16
    """Endpoints sent to at once by this replica."""
    poll_interval: float = 1.0
    """How often the scheduler looks for due deliveries when nothing woke it."""
    intake_batch: int = 256
    allow_private_targets: bool = False
    """Deliver to loopback, private and link-local addresses (local runs and tests only: a
    tenant's webhook must not reach the platform's own network)."""
    response_excerpt_chars: int = 500

    alertmanager_token: Secret = Secret("")
    """POST /alertmanager wants ``Authorization: Bearer <token>`` (Alertmanager's
    http_config.authorization). Required unless HTTP_HOST is loopback; when set, it must be
    strong (32 characters or more, no placeholder)."""

    smtp_host: str = ""
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: Secret = Secret("")
    smtp_from: str = "CrossLogic <notifications@crosslogic.invalid>"
    smtp_security: str = "starttls"
    """starttls, tls (implicit, port 465) or none."""
    smtp_timeout_seconds: float = 20.0


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"0,5,300"`` → (0.0, 5.0, 300.0); ValueError for anything else."""
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"RETRY_SCHEDULE must be comma-separated seconds, not {text!r}") \
            from None
    if not delays or any(d < 0 for d in delays):
        raise ValueError("RETRY_SCHEDULE needs at least one delay, none negative")
    return delays


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the service to this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or "" (every interface): reachable from elsewhere


def check_intake(settings: NotifierSettings) -> None:
    """The Alertmanager intake turns any POST into alerts sent to every platform subscription:
    open only to this machine, or guarded by a strong token."""
    if settings.alertmanager_token:
        require_strong_token("ALERTMANAGER_TOKEN", settings.alertmanager_token,
                             "it guards POST /alertmanager")
    elif not is_loopback(settings.http_host):
        raise SettingsError(
            f"ALERTMANAGER_TOKEN is empty while HTTP_HOST is {settings.http_host!r}: anyone who "
            "reaches the notifier could send alerts to every platform subscription. Set "
            f"ALERTMANAGER_TOKEN (make one with: {MAKE_A_TOKEN}) and give Alertmanager the "
            "same, or listen on loopback only (HTTP_HOST=127.0.0.1)")


def check_settings(settings: NotifierSettings) -> None:
    check_intake(settings)
    parse_schedule(settings.retry_schedule)
    if settings.smtp_security not in ("starttls", "tls", "none"):
        raise ValueError("SMTP_SECURITY must be starttls, tls or none")
    longest = max(settings.http_timeout_seconds, settings.smtp_timeout_seconds)
    if settings.lease_seconds <= longest:
        raise ValueError("LEASE_SECONDS must exceed the HTTP and SMTP timeouts")
    if settings.concurrency < 1:
        raise ValueError("CONCURRENCY must be at least 1")
