"""Partial changes of a Quota (an environment's or an API key's limits), merged into the whole
quota that the events carry."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from schemas.events import Quota

QuotaChanges = Mapping[str, int | None]
"""A partial change of a Quota: the fields present are set (None clears a limit), the others
are kept."""


def merge_quota(current: Quota, changes: QuotaChanges) -> Quota:
    """`current` with `changes` applied. Events carry whole quotas (the projection replaces
    all columns at once), so a partial change is merged here, against the row it was read
    with, inside the command's transaction."""
    allowed = Quota.__struct_fields__
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"unknown quota fields: {', '.join(unknown)}")
    values = {f: getattr(current, f) for f in allowed}
    values.update(changes)
    return Quota(**values)


def quota_of(row: asyncpg.Record) -> Quota:
    """The limits columns of an environments or api_keys row (environments have no
    concurrency column: `get` gives None)."""
    return Quota(requests_per_minute=row.get("requests_per_minute"),
                 tokens_per_minute=row.get("tokens_per_minute"),
                 tokens_per_day=row.get("tokens_per_day"),
                 concurrency=row.get("concurrency"))
