"""`crosslogic backup` and `crosslogic restore`: the database as one pg_dump file (custom
format), and back.

The event log is the truth; the projections are rebuilt from it after a restore, so a backup
taken while projections lagged restores to tables that are exactly what the log says.

pg_dump refuses a server newer than itself: we use PostgreSQL 16's tools, from the embedded
server's package when it is installed, else the first `pg_dump` on PATH that is new enough.
The password never appears on a command line (other users can read those): it goes to the
tools through PGPASSWORD.

The log's order is (transaction id, position), and readers stop below the oldest running
transaction id of *this* cluster. Restored transaction ids come from the cluster the dump was
taken on: on another cluster they can be far ahead of its own (readers would hide every
restored event) or behind it in a way that makes a restored checkpoint skip new events. So a
restore renumbers them: small ids, below any the new cluster hands out, in the same order,
and moves every checkpoint to the same event under its new numbers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIN_MAJOR = 16


class BackupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    url: str
    """The connection URL without its password."""
    password: str

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def split_password(url: str) -> Target:
    """`postgresql://u:secret@h/db` → (`postgresql://u@h/db`, `secret`)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return Target(url, "")
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = urllib.parse.quote(urllib.parse.unquote(parts.username or ""), safe="")
    netloc = f"{user}@{netloc}" if user else netloc
    return Target(urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
                  urllib.parse.unquote(parts.password))


def _major(tool: Path) -> int:
    out = subprocess.run([str(tool), "--version"], capture_output=True, text=True,
                         check=False).stdout
    found = re.search(r"\)\s+(\d+)", out)
    return int(found.group(1)) if found else 0


def find_tool(name: str) -> Path:
    """`pg_dump` or `pg_restore`, PostgreSQL 16 or newer."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations)))
                          / "pginstall" / "bin" / name)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for tool in candidates:
        if tool.exists() and _major(tool) >= MIN_MAJOR:
            return tool
    raise BackupError(f"no {name} of PostgreSQL {MIN_MAJOR} or newer: install the project's "
                      f"[embedded] extra or PostgreSQL {MIN_MAJOR}'s client tools")


def backup(database_url: str, out: Path) -> int:
    """Write the whole database to `out`; returns its size in bytes."""
    target = split_password(database_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    done = subprocess.run([str(find_tool("pg_dump")), "--format=custom", "--no-owner",
                           "--no-privileges", f"--file={partial}", f"--dbname={target.url}"],
                          env=target.env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"pg_dump failed: {done.stderr.strip()}")
    partial.replace(out)  # a file under the final name is always a whole backup
    return out.stat().st_size


def restore(database_url: str, dump: Path) -> None:
    """Replace what the database holds with `dump`, in one transaction."""
    if not dump.is_file():
        raise BackupError(f"{dump}: no such file")
    target = split_password(database_url)
    done = subprocess.run([str(find_tool("pg_restore")), "--clean", "--if-exists",
                           "--no-owner", "--no-privileges", "--single-transaction",
                           "--exit-on-error", f"--dbname={target.url}", str(dump)],
                          env=target.env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"pg_restore failed: {done.stderr.strip()}")
    asyncio.run(renumber_transactions(database_url))


# Walk the log in its order; a new number starts only where position order breaks (where
# transactions overlapped), so positions rise within each number and (number, position) is
# the old order. Usually one number, or a handful: always far below the cluster's own ids.
_RENUMBER = """
CREATE TEMP TABLE renumbered ON COMMIT DROP AS
SELECT position, old_tx,
       (1 + sum(CASE WHEN position < previous THEN 1 ELSE 0 END)
            OVER (ORDER BY old_tx, position ROWS UNBOUNDED PRECEDING))::text::xid8 AS new_tx
FROM (SELECT position, transaction_id AS old_tx,
             lag(position) OVER (ORDER BY transaction_id, position) AS previous
      FROM events) ordered;
CREATE INDEX ON renumbered (old_tx, position);
ANALYZE renumbered;
-- Each checkpoint goes to the event it names (or the last one before it) under its new ids.
UPDATE checkpoints c
SET transaction_id = coalesce(m.new_tx, '0'::xid8), position = coalesce(m.position, 0)
FROM checkpoints c2
LEFT JOIN LATERAL (SELECT r.new_tx, r.position FROM renumbered r
                   WHERE (r.old_tx, r.position) <= (c2.transaction_id, c2.position)
                   ORDER BY r.old_tx DESC, r.position DESC LIMIT 1) m ON true
WHERE c.name = c2.name;
ALTER TABLE events DISABLE TRIGGER events_no_update;
UPDATE events e SET transaction_id = r.new_tx
FROM renumbered r WHERE e.position = r.position AND e.transaction_id <> r.new_tx;
ALTER TABLE events ENABLE TRIGGER events_no_update;
"""


async def renumber_transactions(database_url: str) -> int:
    """Give the restored log transaction ids below this cluster's own, keeping its order
    (see the module's docstring); returns how many ids the log uses now."""
    conn = await asyncpg.connect(database_url)
    try:
        if not await conn.fetchval("SELECT to_regclass('events') IS NOT NULL"):
            return 0  # not a CrossLogic database (or an empty one): nothing to renumber
        needed = await conn.fetchval(
            """SELECT 1 + count(*) FILTER (WHERE position < previous)
               FROM (SELECT position, lag(position) OVER (ORDER BY transaction_id, position)
                     AS previous FROM events) ordered""")
        # A brand-new cluster has handed out a few hundred ids: if the log needs more
        # numbers than that, use ids up (each statement on its own is a transaction).
        while int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")) <= needed:
            pass
        async with conn.transaction():
            await conn.execute(_RENUMBER)
        return int(needed)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BackupError(f"renumbering the restored log failed: {exc}") from exc
    finally:
        await conn.close()
