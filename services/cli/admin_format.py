"""How the admin commands print what the API answers: aligned tables for lists, `field: value`
lines for one object, JSON for scripts. Pure: strings in, strings out."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

Column = tuple[str, str]
"""(header, field path): ``("RPM", "quota.requests_per_minute")``."""

TENANT_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("NAME", "name"), ("EMAIL", "email"), ("STATUS", "status"),
    ("CREATED", "created_at"))
ENVIRONMENT_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("NAME", "name"), ("REGION", "region"), ("STATUS", "status"),
    ("RPM", "quota.requests_per_minute"), ("TPM", "quota.tokens_per_minute"),
    ("TPD", "quota.tokens_per_day"), ("TENANT", "tenant_id"))
KEY_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("NAME", "name"), ("KEY", "last_four"), ("ROLE", "role"),
    ("STATUS", "status"), ("ENVIRONMENT", "environment_id"), ("EXPIRES", "expires_at"),
    ("CREATED", "created_at"))
MODEL_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("NAME", "name"), ("FAMILY", "family"), ("VRAM GB", "vram_gb"),
    ("INPUT $/M", "input_price_per_million"), ("OUTPUT $/M", "output_price_per_million"),
    ("CONTEXT", "context_length"), ("STATUS", "status"))
DEPLOYMENT_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("MODEL", "model_name"), ("REGIONS", "regions"), ("GPU", "gpu_type"),
    ("SPOT", "spot"), ("MIN", "min_nodes"), ("MAX", "max_nodes"), ("STATUS", "status"))
NODE_COLUMNS: tuple[Column, ...] = (
    ("ID", "id"), ("MODEL", "model_name"), ("REGION", "region"), ("STATUS", "status"),
    ("HEALTH", "heartbeat.health_score"), ("HEARTBEAT AGE S", "heartbeat.age_seconds"),
    ("RUNNING", "heartbeat.num_requests_running"),
    ("WAITING", "heartbeat.num_requests_waiting"), ("ENDPOINT", "endpoint_url"))

_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$")


def pick(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def cell(value: Any) -> str:
    """One value as a table shows it: null as ``-``, lists joined, times to the second."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, str) and _ISO.match(value):
        return value[:19].replace("T", " ")
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Left-aligned columns, two spaces apart, headers first; the last column is not padded."""
    table = [[h for h, _ in columns]] + [[cell(pick(r, path)) for _, path in columns]
                                         for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for line in table:
        padded = [text.ljust(widths[i]) for i, text in enumerate(line[:-1])] + [line[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, value in obj.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", value))
    return out


def format_object(obj: Mapping[str, Any]) -> str:
    """``field: value`` lines, nested objects as ``quota.requests_per_minute``."""
    pairs = _flatten(obj)
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in pairs)


def format_json(obj: Any) -> str:
    return json.dumps(obj, indent=2)


def new_key_message(answer: Mapping[str, Any]) -> str:
    """What `keys create` and `keys rotate` print: the plaintext once, with a warning."""
    return (f"API key {answer['id']} (environment {answer['environment_id']}, "
            f"role {answer['role']})\n\n"
            f"  {answer['key']}\n\n"
            "This is the only time the key is shown: store it now.")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(m|h|d)$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_expires(value: str, now: datetime | None = None) -> str:
    """``30d`` / ``12h`` / ``90m`` from now, or an ISO-8601 time (UTC when it has no zone),
    as the ISO-8601 text the API takes."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value.strip())
    if match:
        when = now + timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"--expires wants a duration like 30d, 12h, 90m or an ISO time, "
                             f"not {value!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
