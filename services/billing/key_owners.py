"""Who each API key belongs to, read from the catalog's projections for the usage recorder:
once per batch for the keys it has not seen, then from memory (a key's environment and tenant
never change), so checking every record costs no query per record."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from services.billing.usage_checks import KeyOwner
from services.infra.db import Connection

_OWNERS = """
SELECT k.id, k.tenant_id, k.environment_id, e.tenant_id AS environment_tenant_id,
       t.id IS NOT NULL AS tenant_exists
FROM api_keys k
LEFT JOIN environments e ON e.id = k.environment_id
LEFT JOIN tenants t ON t.id = k.tenant_id
WHERE k.id = ANY($1::uuid[])
"""


class KeyOwners:
    def __init__(self, max_size: int = 500_000) -> None:
        self.max_size = max_size
        self._known: dict[uuid.UUID, KeyOwner] = {}
        self.lookups = 0
        """Queries made (the benchmark and tests watch it)."""

    async def of(self, conn: Connection, key_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, KeyOwner]:
        """The owner of each of `key_ids` the catalog knows; at most one query."""
        found: dict[uuid.UUID, KeyOwner] = {}
        missing: set[uuid.UUID] = set()
        for key in key_ids:
            owner = self._known.get(key)
            if owner is None:
                missing.add(key)
            else:
                found[key] = owner
        if not missing:
            return found
        self.lookups += 1
        rows = await conn.fetch(_OWNERS, list(missing))
        if len(self._known) + len(rows) > self.max_size:
            self._known.clear()  # a bound, not an eviction policy: refilled batch by batch
        for r in rows:
            owner = KeyOwner(tenant_id=r["tenant_id"], environment_id=r["environment_id"],
                             environment_tenant_id=r["environment_tenant_id"],
                             tenant_exists=r["tenant_exists"])
            found[r["id"]] = owner
            # Not remembered while incomplete: a row the catalog has not written yet may be.
            if owner.environment_tenant_id is not None and owner.tenant_exists:
                self._known[r["id"]] = owner
        return found
