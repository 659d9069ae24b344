"""Notification subscriptions: who hears which events, where (Discord, Slack, e-mail, a signed
generic webhook), and their delivery log. The notifier service delivers; this is where they
are made, read, deleted, and where a failed delivery is replayed."""

from __future__ import annotations

import uuid
from typing import Annotated

from aiohttp import web
from msgspec import Meta

from services.admin.routing import PAGE_QUERY, QueryParam, Route, add
from services.admin.web_io import (
    db,
    json_response,
    no_content,
    page_query,
    path_id,
    read_body,
    require,
)
from services.domain.catalog import NotFound
from services.domain.catalog.bodies import (
    Body,
)
from services.domain.notifications import Notifications
from services.domain.notifications import queries as q
from services.domain.notifications.queries import (
    NotificationAttemptRecord,
    NotificationDeliveryDetail,
    NotificationDeliveryRecord,
    NotificationSubscriptionRecord,
)
from services.domain.notifications.rules import MAX_PATTERN_LENGTH, MAX_PATTERNS, PATTERN_REGEX
from services.domain.notifications.targets import MAX_URL_LENGTH, SECRET_PATTERN
from services.infra.errors import ApiError
from services.infra.http import EVENTLOG, REQUEST_ID
from services.infra.page import Page
from services.infra.request_checks import (
    NO_NUL,
    WHITE_SPACE_CLASS,
    Choice,
    FieldError,
    Uuid,
    next_cursor,
    parse_id,
)

Pattern = Annotated[str, Meta(
    min_length=1, max_length=MAX_PATTERN_LENGTH, examples=["node.*"],
    # The document states check_patterns' syntax (PATTERN_REGEX), which checks it (a 400
    # that says what a pattern may hold). Not msgspec's `pattern=`: it would replace this one.
    extra_json_schema={"pattern": PATTERN_REGEX},
    description="a glob on the event type: lower-case letters, digits, '_', '.', and the "
                "wildcards `*` and `?`")]
EventTypes = Annotated[list[Pattern], Meta(
    min_length=1, max_length=MAX_PATTERNS, extra_json_schema={"uniqueItems": True},
    description="event type patterns, e.g. node.*, billing.payment_failed, "
                "notification.alert; heartbeats and usage are not deliverable: a pattern "
                "that only heartbeats or usage events match (usage.*, node.heartbeat) is a "
                "400")]
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_HOST = rf"https?://[A-Za-z0-9.-]+(:{_PORT})?"
_TOKEN = r"[A-Za-z0-9_-]+"
_URL_REST = f"[^#\\x00{WHITE_SPACE_CLASS}]*"


class _SubscriptionCreate(Body, frozen=True, kw_only=True, tag_field="kind"):
    event_types: EventTypes
    tenant_id: uuid.UUID | None = None
    """A tenant's subscription hears only that tenant's events; absent: a platform one."""
    description: Annotated[str, Meta(max_length=500, pattern=NO_NUL)] = ""

    @property
    def kind(self) -> str:
        return str(self.__struct_config__.tag)


def _target(pattern: str) -> dict[str, str]:
    """A target's rule as the document states it. services/domain/notifications/targets.py
    checks it (with messages that say what a target of the kind looks like)."""
    return {"pattern": pattern}


class EmailSubscriptionCreate(_SubscriptionCreate, frozen=True, kw_only=True, tag="email"):
    target: Annotated[str, Meta(
        max_length=254, extra_json_schema=_target(
            r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$"),
        description="the e-mail address; shown masked from then on")]


class DiscordSubscriptionCreate(_SubscriptionCreate, frozen=True, kw_only=True,
                                tag="discord"):
    target: Annotated[str, Meta(
        max_length=MAX_URL_LENGTH,
        extra_json_schema=_target(f"^{_HOST}/api(/v[0-9]+)?/webhooks/[0-9]+/{_TOKEN}/?$"),
        description="the webhook URL, https://discord.com/api/webhooks/<id>/<token>; shown "
                    "masked from then on")]


class SlackSubscriptionCreate(_SubscriptionCreate, frozen=True, kw_only=True, tag="slack"):
    target: Annotated[str, Meta(
        max_length=MAX_URL_LENGTH,
        extra_json_schema=_target(f"^{_HOST}/services/{_TOKEN}/{_TOKEN}/{_TOKEN}/?$"),
        description="the incoming webhook URL, https://hooks.slack.com/services/<T…>/<B…>/"
                    "<token>; shown masked from then on")]


class GenericSubscriptionCreate(_SubscriptionCreate, frozen=True, kw_only=True,
                                tag="generic"):
    target: Annotated[str, Meta(
        max_length=MAX_URL_LENGTH,
        # No white space as Python counts it (check_target's rule), not JSON Schema's `\\s`.
        extra_json_schema=_target(f"^{_HOST}(/{_URL_REST})?(\\?{_URL_REST})?$"),
        description="the endpoint's http(s) URL (no #fragment, no white space); shown masked "
                    "from then on")]
    secret: Annotated[str, Meta(
        max_length=200, extra_json_schema=_target(SECRET_PATTERN),
        description="a Standard Webhooks secret: whsec_ and 24 to 64 bytes in base64 (`=` "
                    "padding optional); absent or null: one is made and shown once in the "
                    "answer. An empty string is not a secret (400)")] | None = None


NotificationSubscriptionCreate = (EmailSubscriptionCreate | DiscordSubscriptionCreate
                                  | SlackSubscriptionCreate | GenericSubscriptionCreate)
"""By `kind`: what its `target` must be (checked again by services/domain/notifications)."""


class NotificationSubscriptionWithSecret(NotificationSubscriptionRecord, frozen=True,
                                         kw_only=True):
    """A subscription just made: a generic one with its signing secret, shown this once."""

    signing_secret: str | None

    def __repr__(self) -> str:
        return f"NotificationSubscriptionWithSecret(id={self.id})"


class NotificationSubscriptionList(Page[NotificationSubscriptionRecord], kw_only=True, frozen=True):
    pass


class NotificationDeliveryList(Page[NotificationDeliveryRecord], kw_only=True, frozen=True):
    pass


class NotificationAttemptList(Page[NotificationAttemptRecord], kw_only=True, frozen=True):
    pass


DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")


def _notifications(request: web.Request) -> Notifications:
    return Notifications(request.app[EVENTLOG], actor="admin-api",
                         correlation_id=request[REQUEST_ID])


async def _subscription(request: web.Request) -> uuid.UUID:
    subscription_id = path_id(request, "subscription_id", "subscription")
    require(await q.get_subscription(db(request), subscription_id), "subscription",
            subscription_id)
    return subscription_id


async def create_notification_subscription(request: web.Request) -> web.Response:
    body: NotificationSubscriptionCreate = await read_body(
        request, NotificationSubscriptionCreate)  # type: ignore[arg-type]
    try:
        new = await _notifications(request).create_subscription(
            kind=body.kind, target=body.target, event_types=body.event_types,
            tenant_id=body.tenant_id,
            signing_secret=body.secret if isinstance(body, GenericSubscriptionCreate) else None,
            description=body.description)
    except NotFound:
        raise ApiError.not_found(f"Tenant {body.tenant_id} not found.", param="tenant_id",
                                 code="tenant_not_found") from None
    record = require(await q.get_subscription(db(request), new.subscription_id),
                     "subscription", new.subscription_id)
    fields = {f: getattr(record, f) for f in record.__struct_fields__}
    return json_response(NotificationSubscriptionWithSecret(
        **fields, signing_secret=new.signing_secret), 201)


async def list_notification_subscriptions(request: web.Request) -> web.Response:
    page = page_query(request, extra=("tenant_id", "scope"))
    tenant = request.query.get("tenant_id")
    tenant_id = parse_id(tenant, "tenant", "tenant_id") if tenant is not None else None
    scope: q.Scope | None = None
    given_scope = request.query.get("scope")
    if given_scope == "platform":
        scope = "platform"
    elif given_scope == "tenant":
        scope = "tenant"
    elif given_scope is not None:
        raise FieldError("'scope' must be platform or tenant.", "scope")
    rows = await q.list_subscriptions(db(request), tenant_id=tenant_id, scope=scope,
                                      after=page.after, limit=page.limit + 1)
    return json_response(NotificationSubscriptionList(
        data=rows[:page.limit], next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def get_notification_subscription(request: web.Request) -> web.Response:
    subscription_id = path_id(request, "subscription_id", "subscription")
    return json_response(require(await q.get_subscription(db(request), subscription_id),
                                 "subscription", subscription_id))


async def delete_notification_subscription(request: web.Request) -> web.Response:
    subscription_id = path_id(request, "subscription_id", "subscription")
    await _notifications(request).delete_subscription(subscription_id)
    return no_content()


async def list_notification_deliveries(request: web.Request) -> web.Response:
    page = page_query(request, extra=("status",))
    status = request.query.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise FieldError(f"'status' must be one of {', '.join(DELIVERY_STATUSES)}.", "status")
    subscription_id = await _subscription(request)
    rows = await q.list_deliveries(db(request), subscription_id, status=status,
                                   before=page.after, limit=page.limit + 1)
    return json_response(NotificationDeliveryList(
        data=rows[:page.limit], next_cursor=next_cursor([r.id for r in rows], page.limit)))


async def get_notification_delivery(request: web.Request) -> web.Response:
    subscription_id = await _subscription(request)
    delivery_id = path_id(request, "delivery_id", "delivery")
    return json_response(require(await q.get_delivery(db(request), subscription_id,
                                                      delivery_id), "delivery", delivery_id))


async def replay_notification_delivery(request: web.Request) -> web.Response:
    subscription_id = path_id(request, "subscription_id", "subscription")
    delivery_id = path_id(request, "delivery_id", "delivery")
    await _notifications(request).replay_delivery(subscription_id, delivery_id)
    detail = require(await q.get_delivery(db(request), subscription_id, delivery_id),
                     "delivery", delivery_id)
    fields = {f: getattr(detail, f) for f in NotificationDeliveryRecord.__struct_fields__}
    return json_response(NotificationDeliveryRecord(**fields), 202)


async def list_notification_attempts(request: web.Request) -> web.Response:
    page = page_query(request)
    subscription_id = await _subscription(request)
    rows = await q.list_attempts(db(request), subscription_id, before=page.after,
                                 limit=page.limit + 1)
    return json_response(NotificationAttemptList(
        data=rows[:page.limit], next_cursor=next_cursor([r.id for r in rows], page.limit)))


TAG = "subscriptions"
_PATH = "/subscriptions/{subscription_id}"
ROUTES = (
    Route("POST", "/subscriptions", create_notification_subscription,
          "Subscribe a Discord, Slack, e-mail or generic endpoint to events (platform-wide, "
          "or one tenant's)", TAG, body=NotificationSubscriptionCreate,
          response=NotificationSubscriptionWithSecret, status=201, errors=(404,),
          description="A generic endpoint's signing secret is in this answer only. Patterns "
                      "that only heartbeats or usage could match are refused (400). A "
                      "`tenant_id` that names no tenant: 404 `tenant_not_found`."),
    Route("GET", "/subscriptions", list_notification_subscriptions,
          "List subscriptions (deleted ones are left out)", TAG,
          response=NotificationSubscriptionList,
          query=(*PAGE_QUERY,
                 QueryParam("tenant_id", "only this tenant's", Uuid()),
                 QueryParam("scope", "only platform or only tenant subscriptions",
                            Choice(("platform", "tenant"))))),
    Route("GET", _PATH, get_notification_subscription,
          "Read a subscription (its target masked)", TAG,
          response=NotificationSubscriptionRecord),
    Route("DELETE", _PATH, delete_notification_subscription,
          "Delete a subscription (idempotent); its pending deliveries are cancelled", TAG,
          status=204),
    Route("GET", _PATH + "/deliveries", list_notification_deliveries,
          "List a subscription's deliveries, newest first", TAG,
          response=NotificationDeliveryList,
          query=(*PAGE_QUERY,
                 QueryParam("status", "only deliveries in this status",
                            Choice(DELIVERY_STATUSES)))),
    Route("GET", _PATH + "/deliveries/{delivery_id}", get_notification_delivery,
          "Read a delivery: the event sent and every attempt", TAG,
          response=NotificationDeliveryDetail),
    Route("POST", _PATH + "/deliveries/{delivery_id}/replay", replay_notification_delivery,
          "Deliver a failed (or cancelled) delivery again, from the start of the schedule",
          TAG, response=NotificationDeliveryRecord, status=202, errors=(409,)),
    Route("GET", _PATH + "/attempts", list_notification_attempts,
          "The subscription's delivery log: every request, newest first (status, latency, "
          "the start of the answer)", TAG, response=NotificationAttemptList, query=PAGE_QUERY),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
