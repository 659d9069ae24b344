"""Pure checks of what callers send (the admin API, and the public API's tenant self-service
routes): decoding errors named by field, the checks a JSON Schema cannot say (price precision,
times in the future, unique regions), paging cursors and query strings. No I/O: handlers call
these and turn `FieldError` into a 400."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TypeVar

import msgspec

from services.core.eventlog import START, EventFilter, LogPosition
from services.core.timeparse import parse_since

T = TypeVar("T")


class FieldError(ValueError):
    """A request that cannot be accepted as sent; `param` is the field's path
    (``quota.requests_per_minute``, ``regions[1]``) or the query parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --------------------------------------------------------------------------- body decoding

_AT = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"^Object (?P<what>contains unknown|missing required) field `(?P<name>[^`]*)`$")


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def describe_validation_error(error: str) -> tuple[str, str | None]:
    """msgspec's ``Expected `int` >= 0 - at `$.quota.requests_per_minute` `` → a message
    naming the field, and the field's path for the error's `param`."""
    match = _AT.match(error)
    assert match is not None  # the pattern matches any text
    text = match.group("text")
    path = (match.group("path") or "").removeprefix(".")
    named = _NAMED.match(text)
    if named is not None:
        param = _join(path, named.group("name"))
        if named.group("what") == "contains unknown":
            return f"Unknown field '{param}'.", param
        return f"Missing required field '{param}'.", param
    if not path:
        return f"Invalid request body: {text}.", None
    return f"Invalid '{path}': {text[0].lower()}{text[1:]}.", path


def decode_body(body: bytes, type_: type[T]) -> T:
    """The body as `type_`; an empty body is ``{}`` (bodies of actions like suspend are
    optional). FieldError names what is wrong."""
    if not body.strip():
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        # msgspec validates while it parses: a body cut short after an unknown field reports
        # the field. Malformed JSON is the truer answer, so check for it first.
        _check_json(body)
        message, param = describe_validation_error(str(exc))
        raise FieldError(message, param) from None
    except msgspec.DecodeError as exc:
        raise FieldError(f"The body is not valid JSON: {exc}.") from None


def _check_json(body: bytes) -> None:
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise FieldError(f"The body is not valid JSON: {exc}.") from None


# --------------------------------------------------------------------------- semantic checks

PRICE_PLACES = 6
PRICE_LIMIT = Decimal(10) ** 14  # numeric(20, 6)


def check_price(value: Decimal, param: str) -> Decimal:
    """A price the catalog can store exactly: finite, not negative, at most 6 decimal
    places, below 10^14."""
    try:
        finite = value.is_finite()
        exponent = value.normalize().as_tuple().exponent
    except InvalidOperation:
        finite, exponent = False, 0
    if not finite:
        raise FieldError(f"'{param}' must be a finite decimal number.", param)
    if value < 0:
        raise FieldError(f"'{param}' must be 0 or more.", param)
    if value >= PRICE_LIMIT:
        raise FieldError(f"'{param}' must be below {PRICE_LIMIT:,}.", param)
    if isinstance(exponent, int) and exponent < -PRICE_PLACES:
        raise FieldError(f"'{param}' has more than {PRICE_PLACES} decimal places.", param)
    return value


def check_future(when: datetime, param: str, now: datetime) -> datetime:
    if when <= now:
        raise FieldError(f"'{param}' must be in the future.", param)
    return when.astimezone(UTC)


def check_unique(values: Sequence[str], param: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise FieldError(f"'{param}[{i}]' repeats {value!r}.", f"{param}[{i}]")
        seen.add(value)


def parse_id(value: str, what: str, param: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise FieldError(f"{value[:80]!r} is not a valid {what} id (a UUID).", param) from None


# --------------------------------------------------------------------------- paging

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def encode_cursor(last_id: uuid.UUID) -> str:
    """Opaque to callers: the last id of the page, base64url."""
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise FieldError("'cursor' is not a cursor this API gave out.", "cursor") from None


def parse_limit(value: str, *, maximum: int, param: str = "limit") -> int:
    try:
        limit = int(value)
    except ValueError:
        raise FieldError(f"'{param}' must be an integer, not {value[:40]!r}.", param) from None
    if not 1 <= limit <= maximum:
        raise FieldError(f"'{param}' must be between 1 and {maximum}.", param)
    return limit


@dataclass(frozen=True)
class PageQuery:
    after: uuid.UUID | None = None
    limit: int = DEFAULT_LIMIT


def _single(pairs: Sequence[tuple[str, str]], allowed: Iterable[str],
            repeatable: Iterable[str] = ()) -> dict[str, list[str]]:
    """Query parameters by name; unknown ones and repeats of single ones are refused (a typo
    in a filter must not silently widen it)."""
    allowed_set, repeat_set = set(allowed), set(repeatable)
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        if name not in allowed_set:
            known = ", ".join(sorted(allowed_set)) or "none"
            raise FieldError(f"Unknown query parameter '{name}' (known: {known}).", name)
        found.setdefault(name, []).append(value)
        if len(found[name]) > 1 and name not in repeat_set:
            raise FieldError(f"Query parameter '{name}' is given more than once.", name)
    return found


def parse_page_query(pairs: Sequence[tuple[str, str]], extra: Iterable[str] = ()) -> PageQuery:
    """``?limit=50&cursor=…`` of every list route (plus the route's own filters, `extra`,
    which the route reads itself)."""
    found = _single(pairs, ("limit", "cursor", *extra))
    limit = parse_limit(found["limit"][0], maximum=MAX_LIMIT) if "limit" in found \
        else DEFAULT_LIMIT
    after = decode_cursor(found["cursor"][0]) if "cursor" in found else None
    return PageQuery(after, limit)


def next_cursor(ids: Sequence[uuid.UUID], limit: int) -> str | None:
    """Lists fetch `limit + 1` rows: a row beyond the page means there is a next one."""
    return encode_cursor(ids[limit - 1]) if len(ids) > limit else None


# --------------------------------------------------------------------------- events

DEFAULT_EVENT_LIMIT = 100
MAX_EVENT_LIMIT = 1000
_GLOB = re.compile(r"^[A-Za-z0-9_.*?:\-]{1,200}$")


@dataclass(frozen=True)
class EventQuery:
    filter: EventFilter
    after: LogPosition = START
    limit: int = DEFAULT_EVENT_LIMIT


def encode_position(position: LogPosition) -> str:
    return str(position)


def decode_position(value: str, param: str = "cursor") -> LogPosition:
    tx, sep, pos = value.partition(":")
    try:
        if not sep:
            raise ValueError
        found = LogPosition(int(tx), int(pos))
    except ValueError:
        raise FieldError(f"'{param}' is not a position this API gave out.", param) from None
    if found.transaction_id < 0 or found.position < 0:
        raise FieldError(f"'{param}' is not a position this API gave out.", param)
    return found


def parse_event_query(pairs: Sequence[tuple[str, str]], *, now: datetime | None = None,
                      paged: bool = True) -> EventQuery:
    """``type`` (repeatable glob), ``stream`` (glob), ``since`` (10m, 2h, 7d or ISO time),
    ``from`` (log position), ``cursor`` (resume) and, for history, ``limit``."""
    allowed = ["type", "stream", "since", "from", "cursor"] + (["limit"] if paged else [])
    found = _single(pairs, allowed, repeatable=("type",))
    types = tuple(found.get("type", ()))
    for t in types:
        if not _GLOB.match(t):
            raise FieldError(f"'type' {t[:80]!r} is not an event type or glob.", "type")
    stream = found["stream"][0] if "stream" in found else None
    if stream is not None and not _GLOB.match(stream):
        raise FieldError(f"'stream' {stream[:80]!r} is not a stream name or glob.", "stream")
    since = None
    if "since" in found:
        try:
            since = parse_since(found["since"][0], now)
        except ValueError:
            raise FieldError("'since' wants a duration like 10m, 2h, 7d or an ISO time.",
                             "since") from None
    min_position = None
    if "from" in found:
        try:
            min_position = int(found["from"][0])
        except ValueError:
            raise FieldError("'from' must be a log position (an integer).", "from") from None
        if min_position < 0:
            raise FieldError("'from' must be 0 or more.", "from")
    after = decode_position(found["cursor"][0]) if "cursor" in found else START
    limit = parse_limit(found["limit"][0], maximum=MAX_EVENT_LIMIT) if "limit" in found \
        else DEFAULT_EVENT_LIMIT
    return EventQuery(EventFilter(types=types, stream=stream, min_position=min_position,
                                  since=since), after, limit)
