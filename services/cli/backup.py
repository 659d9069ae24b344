"""`crosslogic backup` and `crosslogic restore`: the database as one pg_dump file (custom
format), and back.

The event log is the truth; the projections are rebuilt from it after a restore, so a backup
taken while projections lagged restores to tables that are exactly what the log says.

pg_dump refuses a server newer than itself: we use PostgreSQL 16's tools, from the embedded
server's package when it is installed, else the first `pg_dump` on PATH that is new enough.
The password never appears on a command line (other users can read those): it goes to the
tools through PGPASSWORD.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

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
