"""The control-plane catalog (tenants, environments, API keys, models, deployments): projections
of the log that the gateway reads and the admin API writes through `Catalog` commands; reads
as typed records are in `services.domain.catalog.queries`."""

from services.domain.catalog.api_keys import (
    API_KEY_PREFIX,
    KEEP,
    NewApiKey,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
)
from services.domain.catalog.commands import Catalog
from services.domain.catalog.errors import CatalogError, Conflict, Invalid, NotFound
from services.domain.catalog.projections import catalog_projections
from services.domain.catalog.quotas import QuotaChanges, merge_quota

__all__ = ["API_KEY_PREFIX", "KEEP", "Catalog", "CatalogError", "Conflict", "Invalid", "NewApiKey",
           "NotFound", "QuotaChanges", "catalog_projections", "generate_api_key", "hash_api_key",
           "looks_like_api_key", "merge_quota"]
