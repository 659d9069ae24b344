"""Typed settings read once from the environment, then passed in: never imported as a global.

A service declares a msgspec Struct subclass of `CoreSettings`; `load_settings(MySettings)` reads
each field from the upper-cased environment variable of the same name (``database_url`` ←
``DATABASE_URL``), converting strings to the field's type and naming the variable on error.
Secrets are `Secret` values: their repr and str are masked, so settings can be logged whole.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
import msgspec.structs


class Secret:
    """A value that never shows itself in logs, reprs or tracebacks; `.reveal()` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and `crosslogic dev`'s banner."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


class SettingsError(ValueError):
    """An environment variable is missing or does not parse; the message names it."""


TOKEN_MIN_LENGTH = 32
MAKE_A_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
_PLACEHOLDERS = ("replaceme", "changeme", "placeholder", "yourtoken", "yoursecret",
                 "example", "insecure")
"""Texts of templates and tutorials (compared without case, spaces, dashes or underscores),
long enough that a random token never contains one by chance."""
_MIN_DISTINCT = 6


def weak_token_reason(token: str) -> str | None:
    """Why `token` is no fit shared secret (empty, a template's placeholder, short, or a
    repeated pattern), or None when it will do. Pure; the reason never quotes the token."""
    value = token.strip()
    if not value:
        return "is empty"
    folded = "".join(c for c in value.lower() if c.isalnum())
    for placeholder in _PLACEHOLDERS:
        if placeholder in folded:
            return f"is a placeholder (it contains {placeholder!r})"
    if len(value) < TOKEN_MIN_LENGTH:
        return f"is too short ({len(value)} characters; at least {TOKEN_MIN_LENGTH})"
    if len(set(value)) < _MIN_DISTINCT:
        return "is a repeated pattern, not a random string"
    return None


def require_strong_token(name: str, token: Secret, why: str = "") -> None:
    """SettingsError, naming the variable `name` and how to make a good one, unless `token`
    is fit to guard a service (`weak_token_reason`). `why` says what the token protects."""
    reason = weak_token_reason(token.reveal())
    if reason is None:
        return
    guard = f" ({why})" if why else ""
    raise SettingsError(f"{name} {reason}: the service refuses to start with a weak "
                        f"token{guard}. Make one with: {MAKE_A_TOKEN}")


def placeholder_password(url: str) -> bool:
    """Whether `url` carries a template's placeholder as its password (`REPLACE_ME`,
    `changeme`, …): a manifest deployed before its secrets were filled in. No password is
    not this: a local PostgreSQL or Redis may need none."""
    password = urllib.parse.urlsplit(url).password
    if not password:
        return False
    folded = "".join(c for c in password.lower() if c.isalnum())
    return any(p in folded for p in _PLACEHOLDERS)


class CoreSettings(msgspec.Struct, kw_only=True, frozen=True):
    """What every service needs. Subclass it to add a service's own settings."""

    def __post_init__(self) -> None:
        for name in ("database_url", "redis_url", "nats_url"):
            if placeholder_password(getattr(self, name).reveal()):
                raise SettingsError(f"{name.upper()} has a placeholder for its password: the "
                                    "service refuses to start with one. Set the real password.")

    service_name: str = "crosslogic"
    database_url: Secret = Secret("postgresql://postgres@127.0.0.1:5432/crosslogic")
    redis_url: Secret = Secret("redis://127.0.0.1:6379/0")
    nats_url: Secret = Secret("nats://127.0.0.1:4222")
    nats_creds: Secret = Secret("")
    """This service's NATS credential: the text of its `.creds` file (its JWT and seed),
    from `crosslogic nats init` (docs/security.md). Each service has its own identity."""
    nats_stream_replicas: int = 1
    """Copies of each JetStream stream `crosslogic nats setup` creates or updates: 3 on a
    3-node cluster, so a stream survives a server; 1 on a single server."""
    db_min_connections: int = 2
    db_max_connections: int = 10
    db_statement_timeout_ms: int = 30_000
    """PostgreSQL cancels any statement of this service's pool that runs longer (0: never),
    so one runaway query cannot hold a connection, and with it the pool, for ever."""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    metrics_port: int = 0
    """0: /metrics on the service's own port. Otherwise /metrics is served on this port only
    (kept off a public port); a gateway with N workers uses this port + 0 … N-1."""
    prometheus_enabled: bool = True
    """The reference's PROMETHEUS_ENABLED: false serves no /metrics at all (neither on the
    service's port nor on METRICS_PORT); the counters are still kept, in memory."""
    log_level: str = "info"
    log_json: bool = True
    event_poll_interval: float = 1.0
    """Fallback when LISTEN/NOTIFY misses a wake-up (seconds)."""


S = TypeVar("S", bound=msgspec.Struct)


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret:
        if isinstance(obj, Secret):
            return obj
        if isinstance(obj, str):
            return Secret(obj)
    raise NotImplementedError


ALIASES: dict[str, str] = {"admin_token": "ADMIN_API_TOKEN"}
"""Fields that the reference document's variable names also set (beside ours): a deployment
written from it works unchanged. Setting both names to different values is an error."""


def _reference_names(cls: type[msgspec.Struct], env: Mapping[str, str],
                     raw: dict[str, Any]) -> None:
    """Apply the reference's variable names to `raw`: ALIASES, and REDIS_PASSWORD, which the
    reference gives apart from REDIS_URL (ours carries it in the URL)."""
    for name, alias in ALIASES.items():
        if name not in cls.__struct_fields__ or alias not in env:
            continue
        if name in raw and raw[name] != env[alias]:
            raise SettingsError(f"{name.upper()} and {alias} are both set, to different "
                                "values: set one.")
        raw[name] = env[alias]
    password = env.get("REDIS_PASSWORD")
    if not password or "redis_url" not in cls.__struct_fields__:
        return
    url = raw.get("redis_url")
    if url is None:  # the field's default URL
        url = next(f.default for f in msgspec.structs.fields(cls) if f.name == "redis_url")
    raw["redis_url"] = with_password(url.reveal() if isinstance(url, Secret) else str(url),
                                     password, "REDIS_URL", "REDIS_PASSWORD")


def with_password(url: str, password: str, url_name: str, password_name: str) -> str:
    """`url` with `password` in it (percent-encoded), unless it already has that one;
    SettingsError when it has another."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        if urllib.parse.unquote(parts.password) == password:
            return url
        raise SettingsError(f"{url_name} has a password and {password_name} another: set "
                            "one.")
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    quoted = urllib.parse.quote(password, safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{quoted}@{host}"))


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> S:
    """Build `cls` (any msgspec Struct of settings) from the environment (our variable names,
    and the reference's: `_reference_names`), and explicit overrides, which win."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name in cls.__struct_fields__:
        key = name.upper()
        if key in env:
            raw[name] = env[key]
    _reference_names(cls, env, raw)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        # msgspec says "at `$.http_port`": name the environment variable instead.
        message = str(exc)
        for name in cls.__struct_fields__:
            message = message.replace(f"`$.{name}`", f"{name.upper()}")
        raise SettingsError(f"bad setting: {message}") from exc
