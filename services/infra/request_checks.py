"""Pure checks of what callers send (the admin API, and the public API's tenant self-service
routes): decoding errors named by field, the checks a JSON Schema cannot say (price precision,
times in the future, unique regions), paging cursors and query strings. No I/O: handlers call
these and turn `FieldError` into a 400.

Every value is bounded where it enters: text without NUL (PostgreSQL's text cannot hold
U+0000) and with a length limit, integers within their column (int or bigint), durations and
times the clock can hold, and no empty query value (an empty filter is a mistake, not "no
filter"). Query parameters are declared as `QueryParam`s whose `QueryValue` gives both the
JSON Schema the OpenAPI document states and the check the server makes, so the two cannot
disagree."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

import msgspec

from services.infra.log_records import START, EventFilter, LogPosition
from services.infra.timeparse import DURATION_PATTERN, parse_since

T = TypeVar("T")


class FieldError(ValueError):
    """A request that cannot be accepted as sent; `param` is the field's path
    (``quota.requests_per_minute``, ``regions[1]``) or the query parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --------------------------------------------------------------------------- bounded values

INT32_MAX = 2**31 - 1
"""PostgreSQL's integer."""
INT64_MAX = 2**63 - 1
"""PostgreSQL's bigint."""
NO_NUL = r"^[^\x00]*$"
"""The pattern of every free-text value: PostgreSQL's text cannot hold U+0000."""
WHITE_SPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003"
               "\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
"""What Python counts as white space (`str.isspace`, and `\\s` in a `re` pattern): the
characters a server check that uses either refuses."""
WHITE_SPACE_CLASS = (r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f"
                     r"\u205f\u3000")
"""WHITE_SPACE for a regex character class, in the OpenAPI document's patterns: JSON Schema's
`\\s` (ECMA-262's) is another set (it lacks U+001C..U+001F and U+0085, it has U+FEFF), so a
pattern that must refuse what the server refuses names the characters."""
_INTEGER = re.compile(r"^-?[0-9]{1,20}$")


def parse_int(value: str, param: str, *, minimum: int, maximum: int) -> int:
    """A query string's integer: digits (a leading minus allowed), within the bounds."""
    if not _INTEGER.match(value):
        raise FieldError(f"'{param}' must be an integer, not {value[:40]!r}.", param)
    number = int(value)
    if not minimum <= number <= maximum:
        raise FieldError(f"'{param}' must be between {minimum} and {maximum}.", param)
    return number


def check_text(value: str, param: str, *, max_length: int, pattern: str = NO_NUL) -> str:
    """A query string's text: not empty, at most `max_length` characters, matching
    `pattern` (which keeps NUL out)."""
    if "\x00" in value:
        raise FieldError(f"'{param}' contains a NUL character (U+0000).", param)
    if not value:
        raise FieldError(f"'{param}' is empty: give a value, or leave it out.", param)
    if len(value) > max_length:
        raise FieldError(f"'{param}' is longer than {max_length} characters.", param)
    if not re.search(pattern, value):
        raise FieldError(f"'{param}' {value[:80]!r} does not match {pattern}.", param)
    return value


# --------------------------------------------------------------------------- query values


class QueryValue(Protocol):
    """What a query parameter's value may be: the JSON Schema the document states, and the
    check that enforces exactly that (FieldError)."""

    def schema(self) -> dict[str, Any]: ...

    def check(self, value: str, param: str) -> None: ...


@dataclass(frozen=True)
class Text:
    max_length: int = 200
    pattern: str = NO_NUL

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": self.max_length,
                "pattern": self.pattern}

    def check(self, value: str, param: str) -> None:
        check_text(value, param, max_length=self.max_length, pattern=self.pattern)


@dataclass(frozen=True)
class Integer:
    minimum: int
    maximum: int
    default: int | None = None

    def schema(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": "integer", "minimum": self.minimum,
                                 "maximum": self.maximum}
        if self.default is not None:
            found["default"] = self.default
        return found

    def check(self, value: str, param: str) -> None:
        parse_int(value, param, minimum=self.minimum, maximum=self.maximum)


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]
    default: str | None = None

    def schema(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": "string", "enum": list(self.values)}
        if self.default is not None:
            found["default"] = self.default
        return found

    def check(self, value: str, param: str) -> None:
        if value not in self.values:
            raise FieldError(f"'{param}' must be one of {', '.join(self.values)}, not "
                             f"{value[:40]!r}.", param)


@dataclass(frozen=True)
class Uuid:
    def schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "uuid"}

    def check(self, value: str, param: str) -> None:
        parse_id(value, param.removesuffix("_id").replace("_", " "), param)


TIME_MAX_LENGTH = 64


@dataclass(frozen=True)
class TimeOrAgo:
    """An ISO-8601 time, or a duration ago (timeparse's bounds)."""

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": TIME_MAX_LENGTH,
                "anyOf": [{"pattern": DURATION_PATTERN}, {"format": "date-time"}]}

    def check(self, value: str, param: str) -> None:
        parse_time(value, param)


def parse_time(value: str, param: str, now: datetime | None = None) -> datetime:
    """`TimeOrAgo`'s value as a time."""
    if len(value) > TIME_MAX_LENGTH or "\x00" in value or value != value.strip():
        raise FieldError(_TIME_WANTED.format(param=param), param)
    try:
        return parse_since(value, now)
    except ValueError:
        raise FieldError(_TIME_WANTED.format(param=param), param) from None


_TIME_WANTED = ("'{param}' wants an ISO-8601 time (years 1 to 9999) or a duration ago: "
                "at most 9 digits of seconds (s), 7 of minutes (m), 6 of hours (h) or 5 of "
                "days (d), like 30s, 10m, 2h, 7d.")


@dataclass(frozen=True)
class QueryParam:
    """A query parameter of a route: the router checks it, the document states it."""

    name: str
    description: str
    value: QueryValue
    repeatable: bool = False

    @property
    def schema(self) -> dict[str, Any]:
        return self.value.schema()


def check_query(pairs: Sequence[tuple[str, str]], params: Sequence[QueryParam]) -> None:
    """Each parameter known, given once unless repeatable, not empty, and its value as its
    `QueryValue` says (FieldError naming it)."""
    declared = {p.name: p for p in params}
    seen: set[str] = set()
    for name, value in pairs:
        param = declared.get(name)
        if param is None:
            known = ", ".join(sorted(declared)) or "none"
            raise FieldError(f"Unknown query parameter '{name}' (known: {known}).", name)
        if name in seen and not param.repeatable:
            raise FieldError(f"Query parameter '{name}' is given more than once.", name)
        seen.add(name)
        if not value:
            raise FieldError(f"Query parameter '{name}' is empty: give a value, or leave it "
                             "out.", name)
        param.value.check(value, name)


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
    text = text.replace(f"matching regex {NO_NUL!r}", "without NUL characters (U+0000)")
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
    """`when` in UTC, after `now` (and representable in UTC: year 9999 at most)."""
    try:
        utc = when.astimezone(UTC)
    except OverflowError:
        raise FieldError(f"'{param}' is out of range (years 1 to 9999 in UTC).", param) \
            from None
    if utc <= now:
        raise FieldError(f"'{param}' must be in the future.", param)
    return utc


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


CURSOR_PATTERN = r"^[A-Za-z0-9_-]{22}$"
"""A page cursor as `encode_cursor` makes it: a UUID's 16 bytes, base64url, unpadded."""


def decode_cursor(cursor: str) -> uuid.UUID:
    if not re.match(CURSOR_PATTERN, cursor):
        raise FieldError("'cursor' is not a cursor this API gave out.", "cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise FieldError("'cursor' is not a cursor this API gave out.", "cursor") from None


def parse_limit(value: str, *, maximum: int, param: str = "limit") -> int:
    return parse_int(value, param, minimum=1, maximum=maximum)


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
        if not value:
            raise FieldError(f"Query parameter '{name}' is empty: give a value, or leave it "
                             "out.", name)
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
GLOB_PATTERN = r"^[A-Za-z0-9_.*?:-]{1,200}$"
_GLOB = re.compile(GLOB_PATTERN)
POSITION_PATTERN = r"^[0-9]{1,18}:[0-9]{1,18}$"
"""A place in the log as `encode_position` writes it: transaction id and position."""


@dataclass(frozen=True)
class EventQuery:
    filter: EventFilter
    after: LogPosition = START
    limit: int = DEFAULT_EVENT_LIMIT


def encode_position(position: LogPosition) -> str:
    return str(position)


def decode_position(value: str, param: str = "cursor") -> LogPosition:
    if not re.match(POSITION_PATTERN, value):
        raise FieldError(f"'{param}' is not a position this API gave out.", param)
    tx, _, pos = value.partition(":")
    return LogPosition(int(tx), int(pos))


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
    since = parse_time(found["since"][0], "since", now) if "since" in found else None
    min_position = parse_int(found["from"][0], "from", minimum=0, maximum=INT64_MAX) \
        if "from" in found else None
    after = decode_position(found["cursor"][0]) if "cursor" in found else START
    limit = parse_limit(found["limit"][0], maximum=MAX_EVENT_LIMIT) if "limit" in found \
        else DEFAULT_EVENT_LIMIT
    return EventQuery(EventFilter(types=types, stream=stream, min_position=min_position,
                                  since=since), after, limit)
