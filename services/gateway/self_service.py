"""Tenant self-service on the public API: an `admin` key manages its own tenant's API keys and
environments (roles.py says who may do what). The same bodies as the admin API's
(services/domain/catalog/bodies.py) and the same catalog commands, so both write the same events;
but every id is checked against the caller's tenant — another tenant's key or environment is
"not found", never touched — and nothing is granted above the caller's own environment's
quota.

    GET    /v1/api_keys[?environment_id=&limit=&cursor=]   list (masked)
    POST   /v1/api_keys                                    create: the plaintext `key`, once
    GET    /v1/api_keys/{key_id}                           read (masked)
    DELETE /v1/api_keys/{key_id}                           revoke (idempotent)
    POST   /v1/api_keys/{key_id}/rotate                    revoke and make its successor
    GET    /v1/environments[?limit=&cursor=]               list
    POST   /v1/environments                                create

Off the hot path: each call is a PostgreSQL query or transaction, so each counts against the
key's own budget for such calls (USAGE_REQUESTS_PER_MINUTE, shared with GET /v1/usage).
Events carry the calling key as their actor (`api-key:<id>`) and the request id as their
correlation id.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from aiohttp import web

from schemas.events import Quota
from services.domain.catalog import Catalog
from services.domain.catalog import queries as q
from services.domain.catalog.bodies import (
    ApiKeyList,
    EnvironmentCreate,
    EnvironmentList,
    KeyCreate,
    KeyRotate,
    KeyWithSecret,
)
from services.domain.catalog.errors import (
    CatalogError,
    Conflict,
    Invalid,
    LimitReached,
    NotFound,
)
from services.gateway.auth import Principal
from services.gateway.gateway import GATEWAY
from services.gateway.roles import Action, quota_above, within
from services.gateway.routes import authenticate, off_hot_path_budget
from services.infra.errors import ApiError
from services.infra.http import DB, EVENTLOG, REQUEST_ID
from services.infra.request_checks import (
    FieldError,
    decode_body,
    next_cursor,
    parse_id,
    parse_page_query,
)

Handler = Callable[[web.Request], Awaitable[web.Response]]


class KeyCreateHere(KeyCreate, frozen=True, kw_only=True):
    """The admin API's key, plus where: one of the caller's tenant's environments (by default
    the caller's own)."""

    environment_id: uuid.UUID | None = None


def _json(value: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), status=status,
                        content_type="application/json")


async def _admin(request: web.Request) -> Principal:
    """The caller, if its key may manage its tenant, within its budget for such calls."""
    principal = await authenticate(request, Action.MANAGE)
    await off_hot_path_budget(request, principal)
    return principal


def _catalog(request: web.Request, principal: Principal) -> Catalog:
    return Catalog(request.app[EVENTLOG], actor=f"api-key:{principal.key_id}",
                   correlation_id=request[REQUEST_ID])


def _checked(handler: Callable[[web.Request, Principal], Awaitable[web.Response]]) -> Handler:
    """The handler for an admin key, its request's mistakes and the catalog's refusals as
    OpenAI-shaped errors."""
    async def checked(request: web.Request) -> web.Response:
        principal = await _admin(request)
        try:
            return await handler(request, principal)
        except FieldError as exc:
            raise ApiError.invalid_request(exc.message, exc.param) from None
        except Invalid as exc:
            raise ApiError.invalid_request(str(exc), exc.field) from None
        except Conflict as exc:
            raise ApiError.conflict(str(exc)) from None
        except LimitReached as exc:
            raise ApiError.permission(f"{exc}; revoke some first or ask the platform's "
                                      "operators.", code="tenant_limit_reached") from None
        except NotFound as exc:
            raise ApiError.not_found(str(exc)) from None
        except CatalogError as exc:
            raise ApiError.invalid_request(str(exc)) from None

    return checked


T = TypeVar("T")


async def _body(request: web.Request, type_: type[T]) -> T:
    return decode_body(await request.read(), type_)


def _no_query(request: web.Request) -> None:
    if request.query:
        name = next(iter(request.query))
        raise FieldError(f"Unknown query parameter '{name}' (this route takes none).", name)


async def _own_key(request: web.Request, principal: Principal) -> q.ApiKeyRecord:
    """The key named in the path, if it is the caller's tenant's; another tenant's is not
    found, exactly as a key that does not exist."""
    key_id = parse_id(request.match_info["key_id"], "API key", "key_id")
    record = await q.get_api_key(request.app[DB], key_id)
    if record is None or str(record.tenant_id) != principal.tenant_id:
        raise ApiError.not_found(f"No API key with id '{key_id}' in your organization.",
                                 code="api_key_not_found")
    return record


async def _own_environment(request: web.Request, principal: Principal,
                           environment_id: uuid.UUID, param: str) -> q.EnvironmentRecord:
    record = await q.get_environment(request.app[DB], environment_id)
    if record is None or str(record.tenant_id) != principal.tenant_id:
        raise ApiError.not_found(f"No environment with id '{environment_id}' in your "
                                 "organization.", param=param, code="environment_not_found")
    return record


def _quota(record: q.EnvironmentRecord) -> Quota:
    return Quota(requests_per_minute=record.quota.requests_per_minute,
                 tokens_per_minute=record.quota.tokens_per_minute,
                 tokens_per_day=record.quota.tokens_per_day)


def _refuse_above(asked: Quota, ceiling: Quota, body_field: str, environment: str) -> None:
    field = quota_above(asked, ceiling)
    if field is not None:
        raise ApiError(403, f"'{body_field}.{field}' ({getattr(asked, field)}) is above "
                       f"{environment}'s quota ({getattr(ceiling, field)}): a key cannot grant "
                       "more than its environment has.", param=f"{body_field}.{field}",
                       code="quota_exceeded")


# --------------------------------------------------------------------------- API keys


async def list_keys(request: web.Request, principal: Principal) -> web.Response:
    page = parse_page_query(list(request.query.items()), ("environment_id",))
    environment_id = None
    if "environment_id" in request.query:
        environment_id = parse_id(request.query["environment_id"], "environment",
                                  "environment_id")
        await _own_environment(request, principal, environment_id, "environment_id")
    rows = await q.list_api_keys(request.app[DB], tenant_id=uuid.UUID(principal.tenant_id),
                                 environment_id=environment_id, after=page.after,
                                 limit=page.limit + 1)
    return _json(ApiKeyList(data=rows[:page.limit],
                            next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def create_key(request: web.Request, principal: Principal) -> web.Response:
    _no_query(request)
    body = await _body(request, KeyCreateHere)
    environment_id = body.environment_id or uuid.UUID(principal.environment_id)
    environment = await _own_environment(request, principal, environment_id, "environment_id")
    limits = body.limits.quota()
    _refuse_above(limits, _quota(environment), "limits", f"environment '{environment.name}'")
    expires_at = body.expiry(datetime.now(UTC))
    new = await _catalog(request, principal).create_api_key(
        environment_id, name=body.name, role=body.role, limits=limits, expires_at=expires_at,
        tenant_limit=request.app[GATEWAY].settings.self_service_max_keys)
    return await _with_secret(request, new.key_id, new.plaintext)


async def _with_secret(request: web.Request, key_id: uuid.UUID,
                       plaintext: str) -> web.Response:
    record = await q.get_api_key(request.app[DB], key_id)
    if record is None:  # written in this request's transaction: only a bug gets here
        raise ApiError.not_found(f"No API key with id '{key_id}'.")
    return _json(KeyWithSecret.of(record, plaintext), 201)


async def get_key(request: web.Request, principal: Principal) -> web.Response:
    _no_query(request)
    return _json(await _own_key(request, principal))


async def revoke_key(request: web.Request, principal: Principal) -> web.Response:
    _no_query(request)
    record = await _own_key(request, principal)
    await _catalog(request, principal).revoke_api_key(record.id, "revoked by a tenant admin")
    await request.app[GATEWAY].auth.invalidate([await _hash_of(request, record.id)])
    return _json(await _own_key(request, principal))


async def _hash_of(request: web.Request, key_id: uuid.UUID) -> str:
    return str(await request.app[DB].fetchval("SELECT key_hash FROM api_keys WHERE id = $1",
                                              key_id))


async def rotate_key(request: web.Request, principal: Principal) -> web.Response:
    _no_query(request)
    record = await _own_key(request, principal)
    body = await _body(request, KeyRotate)
    now = datetime.now(UTC)
    new = await _catalog(request, principal).rotate_api_key(
        record.id, body.reason or "rotated by a tenant admin", expires_at=body.expiry(now),
        now=now)
    # This process stops taking the old key now; the others on the revocation event.
    await request.app[GATEWAY].auth.invalidate([await _hash_of(request, record.id)])
    return await _with_secret(request, new.key_id, new.plaintext)


# --------------------------------------------------------------------------- environments


async def list_environments(request: web.Request, principal: Principal) -> web.Response:
    page = parse_page_query(list(request.query.items()))
    rows = await q.list_environments(request.app[DB], uuid.UUID(principal.tenant_id),
                                     after=page.after, limit=page.limit + 1)
    return _json(EnvironmentList(data=rows[:page.limit],
                                 next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def create_environment(request: web.Request, principal: Principal) -> web.Response:
    """Within the quota of the caller's own environment: each limit asked for at most that
    one's, each left out taking that one's (the platform's default may be more)."""
    _no_query(request)
    body = await _body(request, EnvironmentCreate)
    own = await _own_environment(request, principal, uuid.UUID(principal.environment_id),
                                 "environment_id")
    asked = body.quota.quota()
    ceiling = _quota(own)
    _refuse_above(asked, ceiling, "quota", f"your key's environment '{own.name}'")
    environment_id = await _catalog(request, principal).create_environment(
        uuid.UUID(principal.tenant_id), body.name, body.region, within(asked, ceiling),
        tenant_limit=request.app[GATEWAY].settings.self_service_max_environments)
    record = await q.get_environment(request.app[DB], environment_id)
    if record is None:  # written in this request's transaction: only a bug gets here
        raise ApiError.not_found(f"No environment with id '{environment_id}'.")
    return _json(record, 201)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/api_keys", _checked(list_keys))
    app.router.add_post("/v1/api_keys", _checked(create_key))
    app.router.add_get("/v1/api_keys/{key_id}", _checked(get_key))
    app.router.add_delete("/v1/api_keys/{key_id}", _checked(revoke_key))
    app.router.add_post("/v1/api_keys/{key_id}/rotate", _checked(rotate_key))
    app.router.add_get("/v1/environments", _checked(list_environments))
    app.router.add_post("/v1/environments", _checked(create_environment))
