"""Commands on subscriptions, like the catalog's: each appends its event and updates the
`notification_subscriptions` projection in one transaction, so the caller reads its own write.

The admin API creates and deletes subscriptions and replays deliveries; the notifier disables
endpoints and reports exhausted deliveries. Errors are the catalog's (`NotFound`, `Conflict`,
`Invalid`), which the admin API already turns into 404, 409 and 400.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.events import (
    Event,
    EventMetadata,
    NotificationDeliveryFailed,
    NotificationEndpointDisabled,
    NotificationSubscriptionCreated,
    NotificationSubscriptionDeleted,
)
from schemas.ids import uuid7
from services.domain.catalog.errors import Conflict, Invalid, NotFound
from services.domain.notifications.projection import NotificationSubscriptionsProjection
from services.domain.notifications.rules import PatternError, check_patterns
from services.domain.notifications.targets import (
    Kind,
    TargetError,
    check_signing_secret,
    check_target,
    generate_signing_secret,
    mask_target,
)
from services.infra.db import Connection
from services.infra.eventlog import ANY, NO_STREAM, EventLog

MAX_DESCRIPTION = 500


@dataclass(frozen=True)
class NewSubscription:
    subscription_id: uuid.UUID
    signing_secret: str | None
    """A generic endpoint's secret, to show once to whoever made it."""

    def __repr__(self) -> str:
        return f"NewSubscription(subscription_id={self.subscription_id})"


class Notifications:
    """`actor` and `correlation_id` go into each event's metadata."""

    def __init__(self, eventlog: EventLog, *, actor: str = "system",
                 correlation_id: str | None = None) -> None:
        self.log = eventlog
        self.actor = actor
        self.correlation_id = correlation_id
        self._projection = NotificationSubscriptionsProjection()

    async def _write(self, conn: Connection, event: Event, expected_version: int) -> None:
        event.metadata = EventMetadata(actor=self.actor, correlation_id=self.correlation_id)
        result = await self.log.append(event.stream, [event], expected_version, conn=conn)
        mine = [r for r in result.events if r.type.startswith("notification.subscription_")
                or r.type == "notification.endpoint_disabled"]
        if mine:
            await self._projection.apply(conn, mine)

    async def create_subscription(self, *, kind: str, target: str, event_types: Sequence[str],
                                  tenant_id: uuid.UUID | None = None,
                                  signing_secret: str | None = None,
                                  description: str = "") -> NewSubscription:
        """A generic endpoint gets a signing secret (the one given, or a new one when it is
        None; an empty one is refused); the others take none. Invalid names the field at
        fault; NotFound for an unknown tenant."""
        try:
            found_kind = Kind(kind)
        except ValueError:
            raise Invalid(f"kind must be one of discord, slack, email, generic, not {kind!r}",
                          "kind") from None
        try:
            stored_target = check_target(found_kind, target)
            if found_kind is Kind.GENERIC:
                # None asks for a new one; any string given, "" too, must be a secret.
                secret = (check_signing_secret(signing_secret) if signing_secret is not None
                          else generate_signing_secret())
            elif signing_secret is not None:
                raise TargetError(f"a {found_kind.value} endpoint takes no signing secret",
                                  "secret")
            else:
                secret = ""
        except TargetError as exc:
            raise Invalid(str(exc), exc.param) from None
        try:
            patterns = check_patterns(list(event_types))
        except PatternError as exc:
            raise Invalid(str(exc), f"event_types[{exc.index}]") from None
        if len(description) > MAX_DESCRIPTION:
            raise Invalid(f"description is longer than {MAX_DESCRIPTION} characters",
                          "description")
        event = NotificationSubscriptionCreated(
            subscription_id=uuid7(), tenant_id=tenant_id, kind=found_kind.value,
            target=mask_target(found_kind, stored_target), event_types=patterns,
            description=description)
        async with self.log.pool.acquire() as conn, conn.transaction():
            if tenant_id is not None and not await conn.fetchval(
                    "SELECT 1 FROM tenants WHERE id = $1", tenant_id):
                raise NotFound(f"tenant {tenant_id} not found")
            await self._write(conn, event, NO_STREAM)
            await conn.execute(
                """INSERT INTO notification_secrets (subscription_id, target, signing_secret)
                   VALUES ($1, $2, $3)""", event.subscription_id, stored_target, secret)
        return NewSubscription(event.subscription_id, secret or None)

    async def _locked(self, conn: Connection, subscription_id: uuid.UUID) -> tuple[str,
                                                                                   uuid.UUID
                                                                                   | None]:
        row = await conn.fetchrow(
            "SELECT status, tenant_id FROM notification_subscriptions WHERE id = $1 FOR UPDATE",
            subscription_id)
        if row is None:
            raise NotFound(f"subscription {subscription_id} not found")
        return row["status"], row["tenant_id"]

    async def delete_subscription(self, subscription_id: uuid.UUID) -> None:
        """Idempotent. Pending deliveries are cancelled; the delivery log stays."""
        async with self.log.pool.acquire() as conn, conn.transaction():
            status, tenant_id = await self._locked(conn, subscription_id)
            if status == "deleted":
                return
            # ANY, under the row lock: the stream also holds delivery_failed events, which the
            # row's version does not count.
            await self._write(conn, NotificationSubscriptionDeleted(
                subscription_id=subscription_id, tenant_id=tenant_id), ANY)
            await _cancel_pending(conn, subscription_id, "subscription deleted")

    async def disable_endpoint(self, subscription_id: uuid.UUID, reason: str, *,
                               last_status_code: int | None = None,
                               conn: Connection | None = None) -> bool:
        """Stop using the endpoint; False when it was not active (already disabled or
        deleted: nothing written)."""
        if conn is None:
            async with self.log.pool.acquire() as own:
                return await self.disable_endpoint(subscription_id, reason,
                                                   last_status_code=last_status_code, conn=own)
        async with conn.transaction():
            status, tenant_id = await self._locked(conn, subscription_id)
            if status != "active":
                return False
            await self._write(conn, NotificationEndpointDisabled(
                subscription_id=subscription_id, tenant_id=tenant_id, reason=reason,
                last_status_code=last_status_code), ANY)
            await _cancel_pending(conn, subscription_id, f"endpoint disabled: {reason}")
        return True

    async def delivery_failed(self, *, conn: Connection, subscription_id: uuid.UUID,
                              tenant_id: uuid.UUID | None, delivery_id: uuid.UUID,
                              event_id: uuid.UUID, event_type: str, attempts: int,
                              last_status_code: int | None, error: str) -> None:
        """Report a delivery whose retry schedule ran out (in the caller's transaction, the
        one that marks it failed)."""
        await self._write(conn, NotificationDeliveryFailed(
            subscription_id=subscription_id, tenant_id=tenant_id, event_id=event_id,
            event_type=event_type, delivery_id=delivery_id, attempts=attempts,
            last_status_code=last_status_code, error=error[:1000]), ANY)

    async def replay_delivery(self, subscription_id: uuid.UUID,
                              delivery_id: uuid.UUID) -> None:
        """Queue a failed (or cancelled) delivery again, from the start of the schedule, in
        its place in the endpoint's event order. Conflict when it is pending or delivered, or
        the subscription is not active."""
        async with self.log.pool.acquire() as conn, conn.transaction():
            status, _ = await self._locked(conn, subscription_id)
            row = await conn.fetchrow(
                """SELECT status FROM notification_deliveries
                   WHERE id = $1 AND subscription_id = $2 FOR UPDATE""",
                delivery_id, subscription_id)
            if row is None:
                raise NotFound(f"delivery {delivery_id} not found")
            if status != "active":
                raise Conflict(f"subscription {subscription_id} is {status}; "
                               "create a new one to deliver again")
            if row["status"] not in ("failed", "cancelled"):
                raise Conflict(f"delivery {delivery_id} is {row['status']}: only failed or "
                               "cancelled deliveries can be replayed")
            await conn.execute(
                """UPDATE notification_deliveries SET status = 'pending', failures = 0,
                       next_attempt_at = now(), lease_until = NULL, lease_token = NULL,
                       updated_at = now()
                   WHERE id = $1""", delivery_id)
            # A replay is an operator saying "try again now": the endpoint's failure clock
            # starts over rather than disabling it on the first failure of the replay.
            await conn.execute(
                "UPDATE notification_endpoints SET failing_since = NULL WHERE subscription_id = $1",
                subscription_id)


async def _cancel_pending(conn: Connection, subscription_id: uuid.UUID, why: str) -> None:
    await conn.execute(
        """UPDATE notification_deliveries SET status = 'cancelled', last_error = $2,
               lease_until = NULL, lease_token = NULL, updated_at = now()
           WHERE subscription_id = $1 AND status = 'pending'""", subscription_id, why[:1000])
