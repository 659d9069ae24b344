"""The lock on one node's stream, for every writer that decides from the node's history.

Appending with an expected version stops two writers from both appending at the same version,
but not a writer whose decision rests on a read that another writer's commit has made stale:
the monitor's intake records what agents say at whatever version the stream is at, so the
orchestrator could commit a node's end while the monitor was accepting its registration, and
`node.accepted` would land after `node.status_changed → failed` (the gateways would route to a
dead node). So both take this transaction-scoped lock before they read: the second waits for
the first's commit, then reads what it wrote.

Taken first in each transaction, before any row lock (the `nodes` row, the `streams` row), and
in node id order when a transaction takes several, so two writers never wait on each other in
a circle.
"""

from __future__ import annotations

import uuid

from services.infra.db import Connection

__all__ = ["NODE_LOCK_CLASS", "lock_node"]

NODE_LOCK_CLASS = 0x6E6F6465
""""node": the first key of ``pg_advisory_xact_lock(int, int)`` (the two-int key space does not
overlap the one-bigint space the other advisory locks use)."""


async def lock_node(conn: Connection, node_id: uuid.UUID) -> None:
    """Lock `node_id`'s stream until the end of `conn`'s transaction (it must be in one)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", NODE_LOCK_CLASS,
                       f"node:{node_id}")
