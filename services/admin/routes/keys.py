"""API keys: made in an environment, shown in plaintext once, listed masked, revoked, rotated."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from aiohttp import web

from services.admin.bodies import (
    KeyPatch,
)
from services.admin.routing import PAGE_QUERY, Route, add
from services.admin.web_io import (
    catalog,
    changes,
    db,
    given,
    json_response,
    page_query,
    path_id,
    read_body,
    require,
)
from services.domain.catalog import NewApiKey
from services.domain.catalog import queries as q
from services.domain.catalog.bodies import (
    ApiKeyList,
    KeyCreate,
    KeyRotate,
    KeyWithSecret,
    StatusChange,
)
from services.domain.catalog.queries import ApiKeyRecord
from services.infra.request_checks import check_future, next_cursor


async def _with_secret(request: web.Request, new: NewApiKey) -> web.Response:
    record = require(await q.get_api_key(db(request), new.key_id), "api key", new.key_id)
    return json_response(KeyWithSecret.of(record, new.plaintext), 201)


async def create_key(request: web.Request) -> web.Response:
    env_id = path_id(request, "environment_id", "environment")
    body = await read_body(request, KeyCreate)
    expires_at = body.expiry(datetime.now(UTC))
    new = await catalog(request).create_api_key(env_id, name=body.name, role=body.role,
                                                limits=body.limits.quota(),
                                                expires_at=expires_at)
    return await _with_secret(request, new)


async def _list(request: web.Request, *, tenant_id: uuid.UUID | None = None,
                environment_id: uuid.UUID | None = None) -> web.Response:
    page = page_query(request)
    rows = await q.list_api_keys(db(request), tenant_id=tenant_id,
                                 environment_id=environment_id, after=page.after,
                                 limit=page.limit + 1)
    return json_response(ApiKeyList(data=rows[:page.limit],
                                    next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def list_tenant_keys(request: web.Request) -> web.Response:
    tenant_id = path_id(request, "tenant_id", "tenant")
    require(await q.get_tenant(db(request), tenant_id), "tenant", tenant_id)
    return await _list(request, tenant_id=tenant_id)


async def list_environment_keys(request: web.Request) -> web.Response:
    env_id = path_id(request, "environment_id", "environment")
    require(await q.get_environment(db(request), env_id), "environment", env_id)
    return await _list(request, environment_id=env_id)


async def get_key(request: web.Request) -> web.Response:
    key_id = path_id(request, "key_id", "api key")
    return json_response(require(await q.get_api_key(db(request), key_id), "api key", key_id))


async def update_key(request: web.Request) -> web.Response:
    key_id = path_id(request, "key_id", "api key")
    body = await read_body(request, KeyPatch)
    expires_at = given(body.expires_at)
    if expires_at is not None:
        expires_at = check_future(expires_at, "expires_at", datetime.now(UTC))
    await catalog(request).update_api_key(key_id, name=given(body.name), role=given(body.role),
                                          limits=changes(body.limits), expires_at=expires_at)
    return await get_key(request)


async def revoke_key(request: web.Request) -> web.Response:
    key_id = path_id(request, "key_id", "api key")
    body = await read_body(request, StatusChange)
    await catalog(request).revoke_api_key(key_id, body.reason)
    return await get_key(request)


async def rotate_key(request: web.Request) -> web.Response:
    key_id = path_id(request, "key_id", "api key")
    body = await read_body(request, KeyRotate)
    now = datetime.now(UTC)
    new = await catalog(request).rotate_api_key(key_id, body.reason or "rotated",
                                                expires_at=body.expiry(now), now=now)
    return await _with_secret(request, new)


TAG = "api keys"
ROUTES = (
    Route("POST", "/environments/{environment_id}/keys", create_key,
          "Create an API key: the plaintext `key` is in this answer and nowhere else", TAG,
          body=KeyCreate, body_required=False, response=KeyWithSecret, status=201),
    Route("GET", "/tenants/{tenant_id}/keys", list_tenant_keys, "List a tenant's keys (masked)",
          TAG, response=ApiKeyList, query=PAGE_QUERY),
    Route("GET", "/environments/{environment_id}/keys", list_environment_keys,
          "List an environment's keys (masked)", TAG, response=ApiKeyList, query=PAGE_QUERY),
    Route("GET", "/keys/{key_id}", get_key, "Read a key (masked)", TAG, response=ApiKeyRecord),
    Route("PATCH", "/keys/{key_id}", update_key,
          "Change a key's name, role, limits (fields given are set, null clears one) or "
          "expiry", TAG, body=KeyPatch, response=ApiKeyRecord, errors=(409,)),
    Route("POST", "/keys/{key_id}/revoke", revoke_key,
          "Revoke a key (idempotent): gateways refuse it within a second", TAG,
          body=StatusChange, body_required=False, response=ApiKeyRecord, errors=(409,)),
    Route("POST", "/keys/{key_id}/rotate", rotate_key,
          "Revoke a key and make its successor (same environment, name, role, limits; the "
          "same expiry unless `expires_at` sets another or null clears it, and required "
          "when the old one has passed); the new plaintext `key` is shown once", TAG,
          body=KeyRotate, body_required=False, response=KeyWithSecret, status=201,
          errors=(409,)),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
