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
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    if service:
        shared.insert(0, _bind_service(service))
    render: list[Any]
    if json:
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        render = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging (asyncpg, nats, aiohttp; its access log is off):
    # at WARNING and above, through the same processors, so a JSON log stream stays JSON —
    # one object per line with level, logger, service and request context — and a secret
    # passed as an `extra` is masked like any other.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # The extras first: _drop_secrets (in `shared`) must see them.
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(),
                           *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render]))
    handler.set_name(_HANDLER)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:
        root.removeHandler(old)  # configured again (tests): replaced, not doubled
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))


_HANDLER = "crosslogic"


def _bind_service(service: str) -> Any:
    def add(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return add
