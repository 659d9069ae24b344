"""Every projection of the platform, by name, for `crosslogic projections …`.

The CLI is not a service: it may know each service's projections. Services never import it.
"""

from __future__ import annotations

from services.billing.projection import UsageRecordsProjection
from services.core.billing_ledger import BillingProjection
from services.core.catalog import catalog_projections
from services.core.event_stats import EventTypeStats
from services.core.fleet import NodesProjection
from services.core.notifications.projection import NotificationSubscriptionsProjection
from services.core.projections import ProjectionRegistry


def all_projections() -> ProjectionRegistry:
    return ProjectionRegistry([EventTypeStats(), *catalog_projections(), NodesProjection(),
                               UsageRecordsProjection(), BillingProjection(),
                               NotificationSubscriptionsProjection()])
