"""PostgreSQL connections: one pool per process, JSON(B) decoded with msgspec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import msgspec

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = (asyncpg.Connection[asyncpg.Record]
                             | PoolConnectionProxy[asyncpg.Record])
    """A connection of its own or one borrowed from a pool: both serve queries alike."""
else:
    Connection = asyncpg.Connection

DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
"""CoreSettings.db_statement_timeout_ms's default, for pools and connections made without a
service's settings (CLI commands, the relay's and leaders' own connections)."""

_json_decode = msgspec.json.decode
_json_encoder = msgspec.json.Encoder()


def _encode_json(value: Any) -> str:
    # Already-encoded JSON text passes through, so callers may hand over either form.
    if isinstance(value, str):
        return value
    return _json_encoder.encode(value).decode()


async def init_connection(conn: Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_encode_json, decoder=_json_decode,
                                  schema="pg_catalog", format="text")


def with_statement_timeout(kwargs: dict[str, Any], timeout_ms: int) -> dict[str, Any]:
    """asyncpg's keyword arguments with PostgreSQL's `statement_timeout` set for the session
    (0: none), keeping any other server settings given."""
    if timeout_ms < 0:
        raise ValueError("statement timeout must be >= 0 milliseconds")
    settings = dict(kwargs.get("server_settings") or {})
    settings["statement_timeout"] = str(timeout_ms)
    return {**kwargs, "server_settings": settings}


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10,
                      statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
                      **kwargs: Any) -> asyncpg.Pool[asyncpg.Record]:
    """A pool whose every connection has `statement_timeout_ms` (services pass their
    DB_STATEMENT_TIMEOUT_MS): a statement running longer is cancelled by the server, and the
    caller gets `asyncpg.QueryCanceledError`."""
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     init=init_connection,
                                     **with_statement_timeout(kwargs, statement_timeout_ms))
    assert pool is not None
    return pool


async def connect(dsn: str, *, statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
                  **kwargs: Any) -> asyncpg.Connection[asyncpg.Record]:
    """A dedicated connection (advisory-lock leadership, LISTEN) with the same codecs and the
    same statement timeout as a pool's."""
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
        dsn, **with_statement_timeout(kwargs, statement_timeout_ms))
    await init_connection(conn)
    return conn
