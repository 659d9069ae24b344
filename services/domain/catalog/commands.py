"""Commands on the catalog: each appends its event and updates the projection in one
transaction, so the caller reads its own write; the outbox relay then tells everyone else.

The admin API is a thin HTTP layer over these; tests and `crosslogic dev` call them directly.
The commands are grouped by aggregate: tenant_commands (tenants, environments, budgets),
api_keys, model_commands (models, deployments); command_base has the write they share.
"""

from __future__ import annotations

from services.domain.catalog.api_keys import ApiKeyCommands
from services.domain.catalog.model_commands import ModelCommands
from services.domain.catalog.tenant_commands import TenantCommands


class Catalog(TenantCommands, ApiKeyCommands, ModelCommands):
    """`correlation_id` (e.g. the admin API's request id) goes into every event's metadata,
    so an operator can find what one request did."""
