"""`crosslogic dev`: the whole platform on this machine with nothing installed but Python.

Embedded PostgreSQL, Redis and NATS (JetStream); migrations; every service of the platform as
its own process (relay, monitor, billing, notifier, admin, gateway, orchestrator); the local
cloud, where GPU nodes are processes (the vLLM simulator and a real node agent); a demo
tenant, environment, model, API key and a deployment of one node, which the orchestrator
launches. It prints a ready-to-paste `curl` and `openai` snippet and stops everything on
Ctrl-C. State lives in a folder and survives restarts (`--fresh` starts over).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from services.cli.dev_banner import banner
from services.cli.dev_demo import DEMO_MODEL, Demo, demo_data, demo_problems
from services.cli.dev_processes import (
    DevError,
    Service,
    Stopping,
    platform_services,
    say,
    start_service,
    stop_services,
    wait_ready,
)
from services.cli.dev_urls import URLS_FILE, DevURLs, write_dev_urls
from services.infra.bus import Bus
from services.infra.db import create_pool
from services.infra.devstack import (
    DevStack,
    DevStackError,
    NatsServer,
    PreferredPorts,
    StackURLs,
    stop_on_signals,
)
from services.infra.logging import configure_logging
from services.infra.migrate import migrate
from services.infra.natsauth.identities import Role


async def _prepare(urls: StackURLs, state: Path, nats: NatsServer) -> tuple[Demo, list[str]]:
    """Migrations, streams and the demo data; with what stands in the demo's way (a
    suspended tenant, a deleted deployment: an operator's doing, kept across runs)."""
    applied = await migrate(urls.database_url)
    say(f"  migrations applied: {len(applied)}")
    bus = await Bus.connect(urls.nats_url, name="crosslogic-dev",
                            creds=nats.creds(Role.PROVISIONER))
    try:
        await bus.ensure_streams()
    finally:
        await bus.close()
    demo = await demo_data(urls.database_url, state)
    pool = await create_pool(urls.database_url, min_size=1, max_size=1)
    try:
        return demo, await demo_problems(pool, demo)
    finally:
        await pool.close()


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return str(error.get("message") or error.get("code") or f"HTTP {exc.code}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {exc.code}"


def nodes_summary(dev: DevURLs) -> str:
    """`1 launching, 1 active`: the nodes as the admin API lists them, for progress lines."""
    request = urllib.request.Request(f"{dev.admin_url}/admin/v1/nodes?limit=200",
                                     headers={"X-Admin-Token": dev.admin_token})
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            nodes: list[dict[str, Any]] = json.loads(resp.read())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return "nodes unknown (admin API not answering)"
    if not nodes:
        return "no GPU node launched yet"
    counts: dict[str, int] = {}
    for node in nodes:
        counts[str(node.get("status"))] = counts.get(str(node.get("status")), 0) + 1
    return "nodes: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _wait_serving(dev: DevURLs, demo: Demo, deadline: float, *,
                  note_every: float = 5.0) -> None:
    """The gateway routes to the node: one real completion through the whole platform.
    Says every `note_every` seconds what it is waiting for; a refused key fails at once."""
    body = json.dumps({"model": DEMO_MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    began = time.monotonic()
    next_note = began + note_every
    last = "no answer yet"
    while True:
        request = urllib.request.Request(
            f"{dev.gateway_url}/v1/chat/completions", data=body, method="POST",
            headers={"Authorization": f"Bearer {demo.api_key}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            text = _error_text(exc)
            if exc.code in (401, 403):
                # Waiting will not change this: an operator revoked or suspended something.
                raise DevError(f"the gateway refuses the demo key (HTTP {exc.code}: {text}); "
                               "fix that, or start over with --fresh") from None
            last = f"the gateway answers {exc.code}: {text}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"the gateway does not answer ({getattr(exc, 'reason', exc)})"
        now = time.monotonic()
        if now > deadline:
            raise DevError(f"no completion went through in time ({last}; {nodes_summary(dev)})"
                           "; see logs/ (orchestrator.log, cloud.log, nodes/)")
        if now >= next_note:
            say(f"  waiting for the simulated GPU node ({now - began:.0f}s): "
                f"{nodes_summary(dev)}; {last}")
            next_note = now + note_every
        time.sleep(0.3)


def run_dev(state_dir: Path, *, fresh: bool) -> int:
    # Progress goes to stderr in our own words; the libraries only speak up when it matters.
    configure_logging("warning", json=False)
    if fresh and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    say(f"crosslogic dev: state in {state_dir}" + (" (fresh)" if fresh else ""))
    stack = DevStack(state_dir, durable=True,
                     ports=PreferredPorts(postgres=55432, redis=56379, nats=54222))
    urls_file = state_dir / URLS_FILE
    services: list[Service] = []
    stopping = Stopping()
    code = 0
    wrote_urls = False  # urls.json of another `crosslogic dev` on this folder stays
    with stop_on_signals():
        try:
            urls = stack.start()
            # The servers are usable from here on (psql, redis-cli, nats), and so is the
            # CLI's database side: it finds them in urls.json.
            write_dev_urls(urls_file, DevURLs(urls.database_url, urls.redis_url, urls.nats_url))
            wrote_urls = True
            say(f"  postgres  {urls.database_url}\n  redis     {urls.redis_url}\n"
                f"  nats      {urls.nats_url}")
            assert stack.nats is not None
            demo, problems = asyncio.run(_prepare(urls, state_dir, stack.nats))
            say("  demo tenant, environment, model and key ready")
            services, dev = platform_services(urls, demo, state_dir, stack.nats)
            deadline = time.monotonic() + 90
            for service in services:
                start_service(service, logs)
            for service in services:
                wait_ready(service, deadline)
                say(f"  {service.name} is up")
            write_dev_urls(urls_file, dev)
            if problems:
                for problem in problems:
                    say(f"  not waiting for a completion: {problem}")
            else:
                _wait_serving(dev, demo, deadline)
                say(f"  a completion went through the whole platform "
                    f"({time.monotonic() - started:.1f}s after start)")
            print(banner(dev, demo, state_dir, problems), flush=True)
            while True:  # until SIGINT/SIGTERM (stop_on_signals raises KeyboardInterrupt)
                signal.pause()
        except KeyboardInterrupt:
            stopping.begin()
            say("\nstopping … (Ctrl-C again to hurry)")
        except (DevError, DevStackError) as exc:
            stopping.begin()
            say(f"crosslogic dev: {exc}")
            code = 1
        finally:
            stopping.begin()
            if wrote_urls:
                with contextlib.suppress(OSError):
                    urls_file.unlink()
            stop_services(services, stopping)
            stack.stop()
    say("stopped cleanly" if code == 0 else "stopped")
    return code
