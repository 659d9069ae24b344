"""The gateway application: the service shell, the HTTP edge, the inference routes."""

from __future__ import annotations

from aiohttp import web

from services.gateway.gateway import GATEWAY_SETTINGS, gateway_ctx
from services.gateway.middleware import MiddlewareConfig, install_middleware
from services.gateway.routes import add_routes
from services.gateway.self_service import add_routes as add_self_service_routes
from services.gateway.settings import GatewaySettings
from services.infra.http import Needs, create_app


def csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def middleware_config(s: GatewaySettings) -> MiddlewareConfig:
    return MiddlewareConfig(max_body_bytes=s.max_body_bytes, request_timeout=s.request_timeout,
                            stream_chunk_timeout=s.stream_chunk_timeout,
                            cors_origins=csv(s.cors_origins),
                            trusted_proxies=csv(s.trusted_proxies))


def create_gateway_app(settings: GatewaySettings) -> web.Application:
    config = middleware_config(settings)
    # Redis is opened by the gateway itself (short timeouts, no client retries), not the shell.
    # Ready while it can serve: warm caches answer without PostgreSQL, usage spools without
    # NATS, and limits fall back to the process without Redis (unless the policy is deny).
    optional = {"postgres", "nats"} | ({"redis"} if settings.ratelimit_policy != "deny" else set())
    app = create_app(settings, needs=Needs(postgres=True, redis=False, nats=True,
                                           serves_without=frozenset(optional)),
                     client_max_size=config.max_body_bytes)
    install_middleware(app, config)
    app[GATEWAY_SETTINGS] = settings
    app.cleanup_ctx.append(gateway_ctx)
    add_routes(app)
    add_self_service_routes(app)
    return app
