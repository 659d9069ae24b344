"""What handlers share: read a typed body, answer JSON, path ids, the request's Catalog."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import asyncpg
import msgspec
from aiohttp import web

from services.domain.catalog import Catalog, NotFound
from services.infra.errors import ApiError
from services.infra.http import DB, EVENTLOG, REQUEST_ID
from services.infra.request_checks import PageQuery, decode_body, parse_id
from services.infra.request_checks import parse_page_query as _parse_page_query

T = TypeVar("T")
ACTOR = "admin-api"
_encoder = msgspec.json.Encoder()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status,
                        content_type="application/json")


def no_content() -> web.Response:
    return web.Response(status=204)


async def read_body(request: web.Request, type_: type[T]) -> T:
    """The body decoded as `type_`. A body must be JSON (415 otherwise); no body at all reads
    as ``{}``, so actions whose fields are all optional need none."""
    if request.body_exists and request.content_type != "application/json":
        raise ApiError.unsupported_media_type(request.headers.get("Content-Type"))
    return decode_body(await request.read(), type_)


def path_id(request: web.Request, name: str, what: str) -> uuid.UUID:
    return parse_id(request.match_info[name], what, name)


def page_query(request: web.Request, extra: tuple[str, ...] = ()) -> PageQuery:
    return _parse_page_query(list(request.query.items()), extra)


def db(request: web.Request) -> asyncpg.Pool[asyncpg.Record]:
    return request.app[DB]


def catalog(request: web.Request) -> Catalog:
    """Events written for this request carry its request id as their correlation id."""
    return Catalog(request.app[EVENTLOG], actor=ACTOR, correlation_id=request[REQUEST_ID])


def given(value: T | msgspec.UnsetType) -> T | None:
    """A PATCH field: None when the caller left it out."""
    return None if isinstance(value, msgspec.UnsetType) else value


def changes(patch: msgspec.Struct | msgspec.UnsetType) -> dict[str, Any] | None:
    """The fields a nested PATCH object sets (null included, to clear); None when absent."""
    if isinstance(patch, msgspec.UnsetType):
        return None
    return {f: getattr(patch, f) for f in patch.__struct_fields__
            if not isinstance(getattr(patch, f), msgspec.UnsetType)}


def require(record: T | None, what: str, id_: uuid.UUID) -> T:
    if record is None:
        raise NotFound(f"{what} {id_} not found")
    return record
