"""The control-plane catalog (tenants, environments, API keys, models, deployments): projections
of the log that the gateway reads and the admin API writes through `Catalog` commands; reads
as typed records are in `services.domain.catalog.queries`."""

from services.domain.catalog.commands import (
    API_KEY_PREFIX,
    KEEP,
    Catalog,
    CatalogError,
    Conflict,
    Invalid,
    NewApiKey,
    NotFound,
    QuotaChanges,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
    merge_quota,
)
from services.domain.catalog.projections import catalog_projections

__all__ = ["API_KEY_PREFIX", "KEEP", "Catalog", "CatalogError", "Conflict", "Invalid", "NewApiKey",
           "NotFound", "QuotaChanges", "catalog_projections", "generate_api_key", "hash_api_key",
           "looks_like_api_key", "merge_quota"]
