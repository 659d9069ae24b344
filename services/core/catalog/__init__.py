"""The control-plane catalog (tenants, environments, API keys, models): projections of the log
that the gateway reads and the admin API writes through `Catalog` commands."""

from services.core.catalog.commands import (
    API_KEY_PREFIX,
    Catalog,
    CatalogError,
    Conflict,
    NewApiKey,
    NotFound,
    generate_api_key,
    hash_api_key,
)
from services.core.catalog.projections import catalog_projections

__all__ = ["API_KEY_PREFIX", "Catalog", "CatalogError", "Conflict", "NewApiKey", "NotFound",
           "catalog_projections", "generate_api_key", "hash_api_key"]
