"""Where notifications go: the kinds of target, their checks, their masked form, signing
secrets. Pure.

A webhook URL is a credential (Discord's and Slack's embed their token), so only its masked
form (`mask_target`) is ever shown, logged or put in an event; the real one is in the
`notification_secrets` table.
"""

from __future__ import annotations

import base64
import re
import secrets
import urllib.parse
from enum import StrEnum


class Kind(StrEnum):
    DISCORD = "discord"
    SLACK = "slack"
    EMAIL = "email"
    GENERIC = "generic"


KINDS = tuple(k.value for k in Kind)
MAX_URL_LENGTH = 2048
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
"""Standard Webhooks recommends 24 to 64 random bytes; we make 32."""
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64


def _secret_pattern(prefix: str, min_bytes: int, max_bytes: int) -> str:
    """What `check_signing_secret` takes, as one regex (the OpenAPI document's `pattern`):
    `prefix`, then base64 of `min_bytes` to `max_bytes` bytes, its `=` padding optional.
    Four characters are three bytes; a last group of two characters is one more byte (and
    takes up to two `=`), of three characters two more (and up to one `=`)."""
    b64 = "[A-Za-z0-9+/]"

    def quads(extra: int) -> str:
        low, high = -(-(min_bytes - extra) // 3), (max_bytes - extra) // 3
        return f"(?:{b64}{{4}}){{{low},{high}}}"

    return (f"^{prefix}(?:{quads(0)}|{quads(1)}{b64}{{2}}={{0,2}}|"
            f"{quads(2)}{b64}{{3}}=?)$")


SECRET_PATTERN = _secret_pattern(SECRET_PREFIX, SECRET_MIN_BYTES, SECRET_MAX_BYTES)
_SECRET = re.compile(SECRET_PATTERN)


class TargetError(ValueError):
    """`param` names the field at fault (``target`` or ``secret``)."""

    def __init__(self, message: str, param: str = "target") -> None:
        super().__init__(message)
        self.param = param


_DISCORD_PATH = re.compile(r"^/api(?:/v\d+)?/webhooks/\d+/[A-Za-z0-9_\-]+/?$")
_SLACK_PATH = re.compile(r"^/services/[A-Za-z0-9_\-]+/[A-Za-z0-9_\-]+/[A-Za-z0-9_\-]+/?$")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-]{1,64}@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*$")


def _url(target: str) -> urllib.parse.SplitResult:
    if len(target) > MAX_URL_LENGTH:
        raise TargetError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() for ch in target):
        raise TargetError("the URL contains white space")
    try:
        parts = urllib.parse.urlsplit(target)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        raise TargetError("the target is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError("the target must be an http(s) URL with a host")
    if parts.fragment:
        raise TargetError("the URL must not have a #fragment")
    return parts


def check_target(kind: Kind, target: str) -> str:
    """`target` as stored, or TargetError saying what is wrong for this kind."""
    target = target.strip()
    if "\x00" in target:
        raise TargetError("the target contains a NUL character (U+0000)")
    if kind is Kind.EMAIL:
        if len(target) > 254 or not _EMAIL.match(target):
            raise TargetError("the target must be an e-mail address (name@example.com)")
        return target
    parts = _url(target)
    if kind is Kind.DISCORD and not _DISCORD_PATH.match(parts.path):
        raise TargetError("a Discord target is a webhook URL: "
                          "https://discord.com/api/webhooks/<id>/<token>")
    if kind is Kind.SLACK and not _SLACK_PATH.match(parts.path):
        raise TargetError("a Slack target is an incoming webhook URL: "
                          "https://hooks.slack.com/services/<T…>/<B…>/<token>")
    if kind in (Kind.DISCORD, Kind.SLACK) and parts.query:
        raise TargetError(f"a {kind.value} webhook URL takes no query string")
    return target


def mask_target(kind: Kind | str, target: str) -> str:
    """What may be shown of a target: the endpoint's host and the non-secret part of its path.
    Discord and Slack URLs keep all but their token; other URLs only their origin; an e-mail
    address its first letter and domain."""
    kind = Kind(kind)
    if kind is Kind.EMAIL:
        local, _, domain = target.partition("@")
        return f"{local[:1]}***@{domain}"
    try:
        parts = urllib.parse.urlsplit(target)
        port = parts.port
    except ValueError:
        return "***"
    host = parts.hostname or ""
    origin = f"{parts.scheme}://{host}" + (f":{port}" if port else "")
    if kind in (Kind.DISCORD, Kind.SLACK):
        head = parts.path.rstrip("/").rsplit("/", 1)[0]
        return f"{origin}{head}/***"
    rest = "/***" if parts.path not in ("", "/") else ""
    return origin + rest + ("?***" if parts.query else "")


def generate_signing_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_signing_secret(secret: str) -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 to 64 bytes in base64, its padding
    optional. The rule is SECRET_PATTERN, which the OpenAPI document states too."""
    if not secret.startswith(SECRET_PREFIX):
        raise TargetError(f"a signing secret starts with {SECRET_PREFIX!r}", "secret")
    if not _SECRET.fullmatch(secret):
        raise TargetError(f"a signing secret is base64 of {SECRET_MIN_BYTES} to "
                          f"{SECRET_MAX_BYTES} bytes after {SECRET_PREFIX!r}", "secret")
    return secret


def scrub(text: str, *secret_values: str) -> str:
    """`text` (an error message, say) with every secret value in it replaced; values too
    short to be a secret (a URL's path ``/``) are left, or the text would be unreadable."""
    for value in sorted(secret_values, key=len, reverse=True):
        if len(value) >= 6:
            text = text.replace(value, "***")
    return text
