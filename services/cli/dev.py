"""`crosslogic dev`: the platform on this machine with nothing installed but Python.

For now it starts the embedded PostgreSQL, Redis and NATS (JetStream), applies migrations,
creates the NATS streams, prints the URLs and stays up until Ctrl-C. State lives in a folder
and survives restarts (`--fresh` starts over).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
from pathlib import Path

from services.core.bus import Bus
from services.core.devstack import DevStack, PreferredPorts, StackURLs, stop_on_signals
from services.core.migrate import migrate

DEFAULT_STATE_DIR = Path(".state/dev")
URLS_FILE = "urls.json"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _prepare(urls: StackURLs) -> None:
    applied = await migrate(urls.database_url)
    _say(f"  migrations applied: {len(applied)}")
    bus = await Bus.connect(urls.nats_url, name="crosslogic-dev")
    try:
        await bus.ensure_streams()
    finally:
        await bus.close()
    _say("  NATS streams ready")


def read_dev_urls(state_dir: Path = DEFAULT_STATE_DIR) -> StackURLs | None:
    """The URLs of a `crosslogic dev` running from this folder, for the other CLI commands."""
    try:
        raw = json.loads((state_dir / URLS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return StackURLs(**raw)


def run_dev(state_dir: Path, *, fresh: bool) -> int:
    if fresh and state_dir.exists():
        shutil.rmtree(state_dir)
    _say(f"crosslogic dev: starting embedded servers under {state_dir} …")
    stack = DevStack(state_dir, durable=True,
                     ports=PreferredPorts(postgres=55432, redis=56379, nats=54222))
    urls_file = state_dir / URLS_FILE
    with stop_on_signals():
        try:
            urls = stack.start()
            _say("  postgres, redis and nats are up")
            asyncio.run(_prepare(urls))
            urls_file.write_text(json.dumps(urls.__dict__, indent=2))
            print(f"""
CrossLogic dev stack is running. Ctrl-C stops it.

  DATABASE_URL={urls.database_url}
  REDIS_URL={urls.redis_url}
  NATS_URL={urls.nats_url}

In another terminal (the CLI finds these URLs by itself while this runs):
  crosslogic events tail
""", flush=True)
            threading.Event().wait()
        except KeyboardInterrupt:
            _say("\nstopping …")
        finally:
            urls_file.unlink(missing_ok=True)
            stack.stop()
    _say("stopped cleanly")
    return 0
