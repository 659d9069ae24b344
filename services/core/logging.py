"""structlog set-up: JSON lines in production, readable lines on a terminal, context bound per
request (request id, tenant id, node id) through contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"authorization", "api_key", "password", "token", "secret", "admin_token",
                          "x-admin-token", "stripe_secret_key"})


def _drop_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # A last line of defence: code should never pass these, but if it does they are masked.
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "**********"
    return event


def configure_logging(level: str = "info", *, json: bool = True,
                      service: str | None = None) -> None:
    """Called once by a process's entry point, never on import."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    if service:
        processors.insert(0, _bind_service(service))
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries using stdlib logging (aiohttp's access log is off; asyncpg, nats) at WARNING+.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _bind_service(service: str) -> Any:
    def add(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return add
