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


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10,
                      **kwargs: Any) -> asyncpg.Pool[asyncpg.Record]:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     init=init_connection, **kwargs)
    assert pool is not None
    return pool


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection[asyncpg.Record]:
    """A dedicated connection (advisory-lock leadership, LISTEN) with the same codecs."""
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn
