"""Every projection of the platform, by name, for `crosslogic projections …`.

The CLI is not a service: it may know each service's projections. Services never import it.
"""

from __future__ import annotations

from services.domain.billing_ledger import BillingProjection
from services.domain.catalog import catalog_projections
from services.domain.fleet import NodesProjection
from services.domain.notifications.projection import NotificationSubscriptionsProjection
from services.domain.usage_records import UsageRecordsProjection
from services.infra.event_stats import EventTypeStats
from services.infra.projections import ProjectionRegistry


def all_projections() -> ProjectionRegistry:
    return ProjectionRegistry([EventTypeStats(), *catalog_projections(), NodesProjection(),
                               UsageRecordsProjection(), BillingProjection(),
                               NotificationSubscriptionsProjection()])
