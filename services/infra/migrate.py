"""SQL migrations: numbered files in `migrations/`, each applied once, in its own transaction.

Replicas that start together race to migrate; a session advisory lock serializes them, so the
second one waits, then finds nothing left to do. A migration edited after it was applied is an
error (its checksum no longer matches), not something to silently re-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

log = structlog.get_logger("migrate")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY = 0x63726F73_736C6F67  # "crosslog"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name must be NNNN_name.sql: {path.name}")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version:04d}")
        found[version] = Migration(version, match.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


async def migrate(dsn: str, folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing; returns the migrations this call applied."""
    migrations = load_migrations(folder)
    # No statement timeout (services have DB_STATEMENT_TIMEOUT_MS, even one set on the role):
    # a migration may rebuild a big table, and waiting for another replica's lock is normal.
    conn: asyncpg.Connection = await asyncpg.connect(dsn,
                                                     server_settings={"statement_timeout": "0"})
    applied_now: list[Migration] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"]: r["checksum"]
                for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version, m.name, m.checksum)
            log.info("migration applied", version=m.version, name=m.name)
            applied_now.append(m)
    finally:
        # Closing the session releases the lock too; unlocking first just hands it over sooner.
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        await conn.close()
    return applied_now
