"""Projection `notification_subscriptions`: subscriptions as the log tells them.

Applied inline by the commands (read-your-writes) and again by the notifier's runner; the row's
`version` makes the second time a no-op. Targets are masked here, as in the events; the real
ones are in `notification_secrets`, which a rebuild does not touch.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas.events import (
    NotificationEndpointDisabled,
    NotificationSubscriptionCreated,
    NotificationSubscriptionDeleted,
)
from services.infra.db import Connection
from services.infra.log_records import RecordedEvent
from services.infra.projections import Projection


class NotificationSubscriptionsProjection(Projection):
    name = "notification_subscriptions"
    tables = ("notification_subscriptions",)
    event_types = ("notification.subscription_*", "notification.endpoint_disabled")

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        for r in events:
            e = r.event
            if isinstance(e, NotificationSubscriptionCreated):
                await conn.execute(
                    """INSERT INTO notification_subscriptions (id, tenant_id, kind,
                           target_masked, event_types, description, status, created_at,
                           updated_at, version)
                       VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $7, $8)
                       ON CONFLICT (id) DO NOTHING""",
                    e.subscription_id, e.tenant_id, e.kind, e.target, e.event_types,
                    e.description, e.occurred_at, r.stream_version)
            elif isinstance(e, NotificationSubscriptionDeleted):
                await conn.execute(
                    """UPDATE notification_subscriptions SET status = 'deleted',
                           updated_at = $2, version = $3
                       WHERE id = $1 AND version < $3""",
                    e.subscription_id, e.occurred_at, r.stream_version)
            elif isinstance(e, NotificationEndpointDisabled):
                # A subscription deleted meanwhile stays deleted.
                await conn.execute(
                    """UPDATE notification_subscriptions SET status = 'disabled',
                           status_reason = $2, updated_at = $3, version = $4
                       WHERE id = $1 AND version < $4 AND status = 'active'""",
                    e.subscription_id, e.reason, e.occurred_at, r.stream_version)
