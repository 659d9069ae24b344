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
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO

from services.core.bus import Bus
from services.core.catalog import Catalog
from services.core.db import create_pool
from services.core.devstack import (
    DevStack,
    PreferredPorts,
    StackURLs,
    die_with_parent,
    free_port,
    stop_on_signals,
)
from services.core.eventlog import EventLog
from services.core.logging import configure_logging
from services.core.migrate import migrate

DEFAULT_STATE_DIR = Path(".state/dev")
URLS_FILE = "urls.json"
DEMO_FILE = "demo.json"
DEMO_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class DevError(RuntimeError):
    """Something of the platform did not come up; the message says what and where to look."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class DevURLs:
    """What other CLI commands need to reach a running `crosslogic dev`."""

    database_url: str = ""
    redis_url: str = ""
    nats_url: str = ""
    gateway_url: str = ""
    admin_url: str = ""
    admin_token: str = ""


def read_dev_urls(state_dir: Path = DEFAULT_STATE_DIR) -> DevURLs | None:
    """The URLs of a `crosslogic dev` running from this folder, for the other CLI commands."""
    try:
        raw = json.loads((state_dir / URLS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    return DevURLs(**{name: value for name in DevURLs.__dataclass_fields__
                      if isinstance(value := raw.get(name), str)})


@dataclass
class Demo:
    tenant_id: str
    environment_id: str
    key_id: str
    api_key: str
    admin_token: str


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = field(default=None, repr=False)


async def _prepare(urls: StackURLs, state: Path) -> Demo:
    applied = await migrate(urls.database_url)
    _say(f"  migrations applied: {len(applied)}")
    bus = await Bus.connect(urls.nats_url, name="crosslogic-dev")
    try:
        await bus.ensure_streams()
    finally:
        await bus.close()
    return await _demo_data(urls.database_url, state)


async def _demo_data(database_url: str, state: Path) -> Demo:
    """The demo tenant, environment, model and key: made once, reused while the key lives."""
    demo_file = state / DEMO_FILE
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        try:
            demo = Demo(**json.loads(demo_file.read_text()))
            status = await pool.fetchval("SELECT status FROM api_keys WHERE id = $1::uuid",
                                         demo.key_id)
            if status == "active":
                return demo
        except (OSError, ValueError, TypeError):
            pass
        catalog = Catalog(EventLog(pool), actor="crosslogic-dev")
        if not await pool.fetchval("SELECT 1 FROM models WHERE name = $1", DEMO_MODEL):
            await catalog.create_model(DEMO_MODEL, family="llama", vram_gb=16,
                                       input_price_per_million=Decimal("0.10"),
                                       output_price_per_million=Decimal("0.20"),
                                       context_length=8192)
        if not await pool.fetchval("SELECT 1 FROM deployments WHERE model_name = $1 "
                                   "AND status = 'active'", DEMO_MODEL):
            await catalog.create_deployment(DEMO_MODEL, regions=["local"], gpu_type="simulated",
                                            spot=False, min_nodes=1, max_nodes=2)
        tenant = await catalog.create_tenant("Demo", "demo@example.com")
        env = await catalog.create_environment(tenant, "development", "local")
        key = await catalog.create_api_key(env, name="demo")
        demo = Demo(str(tenant), str(env), str(key.key_id), key.plaintext,
                    secrets.token_urlsafe(24))
        # Local dev state only: the folder is git-ignored and yours.
        demo_file.write_text(json.dumps(asdict(demo), indent=2))
        demo_file.chmod(0o600)
        return demo
    finally:
        await pool.close()


def _services(urls: StackURLs, demo: Demo, state: Path) -> tuple[list[Service], DevURLs]:
    py = sys.executable
    base = {**os.environ, "DATABASE_URL": urls.database_url, "REDIS_URL": urls.redis_url,
            "NATS_URL": urls.nats_url, "HTTP_HOST": "127.0.0.1", "LOG_LEVEL": "info",
            "LOG_JSON": "true", "EVENT_POLL_INTERVAL": "0.5"}
    ports = {name: free_port(preferred) for name, preferred in
             (("gateway", 8080), ("admin", 8081), ("monitor", 8082), ("billing", 8083),
              ("orchestrator", 8085), ("notifier", 8084), ("relay", 8079), ("cloud", 8090))}
    cloud = f"http://127.0.0.1:{ports['cloud']}"
    services = [
        Service("relay", [py, "-m", "services.cli", "relay"],
                {**base, "HTTP_PORT": str(ports["relay"])},
                f"http://127.0.0.1:{ports['relay']}/ready"),
        Service("monitor", [py, "-m", "services.monitor"],
                {**base, "HTTP_PORT": str(ports["monitor"])},
                f"http://127.0.0.1:{ports['monitor']}/ready"),
        Service("billing", [py, "-m", "services.billing"],
                {**base, "HTTP_PORT": str(ports["billing"])},
                f"http://127.0.0.1:{ports['billing']}/ready"),
        Service("notifier", [py, "-m", "services.notifier"],
                {**base, "HTTP_PORT": str(ports["notifier"]),
                 # Local webhook receivers are the point of a local run.
                 "ALLOW_PRIVATE_TARGETS": "true"},
                f"http://127.0.0.1:{ports['notifier']}/ready"),
        Service("admin", [py, "-m", "services.admin"],
                {**base, "HTTP_PORT": str(ports["admin"]), "ADMIN_TOKEN": demo.admin_token},
                f"http://127.0.0.1:{ports['admin']}/ready"),
        Service("gateway", [py, "-m", "services.gateway"],
                {**base, "HTTP_PORT": str(ports["gateway"]),
                 "USAGE_SPOOL_DIR": str(state / "usage-spool")},
                f"http://127.0.0.1:{ports['gateway']}/ready"),
        Service("cloud", [py, "-m", "agent.local_cloud", "--port", str(ports["cloud"]),
                          "--log-dir", str(state / "logs" / "nodes"),
                          "--simulator-args", "--ttft 0.05 --itl 0.01",
                          "--agent-env", "LOG_JSON=true"],
                dict(os.environ), f"{cloud}/clusters"),
        Service("orchestrator", [py, "-m", "services.orchestrator"],
                {**base, "HTTP_PORT": str(ports["orchestrator"]), "LAUNCHER": "local",
                 "LOCAL_CLOUD_URL": cloud, "DEFAULT_PROVIDER": "local",
                 "NODE_HEARTBEAT_INTERVAL": "5", "RECONCILE_EVERY_SECONDS": "2",
                 "CLOUD_CHECK_EVERY_SECONDS": "2", "LAUNCH_DEADLINE_SECONDS": "60"},
                f"http://127.0.0.1:{ports['orchestrator']}/ready"),
    ]
    dev_urls = DevURLs(urls.database_url, urls.redis_url, urls.nats_url,
                       gateway_url=f"http://127.0.0.1:{ports['gateway']}",
                       admin_url=f"http://127.0.0.1:{ports['admin']}",
                       admin_token=demo.admin_token)
    return services, dev_urls


def _start(service: Service, logs: Path) -> None:
    service.log = open(logs / f"{service.name}.log", "ab")  # noqa: SIM115 - closed in _stop
    # Own session (Ctrl-C reaches only us; we stop them in order) and death with us, so a
    # killed `crosslogic dev` leaves nothing behind.
    service.proc = subprocess.Popen(service.argv, env=service.env, stdout=service.log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=die_with_parent)


def _wait_ready(service: Service, deadline: float) -> None:
    while True:
        assert service.proc is not None
        if service.proc.poll() is not None:
            raise DevError(f"{service.name} exited with code {service.proc.returncode}; "
                               f"see its log")
        if not service.ready_url:
            return
        try:
            with urllib.request.urlopen(service.ready_url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DevError(f"{service.name} not ready in time; see its log")
        time.sleep(0.2)


def _wait_serving(dev: DevURLs, demo: Demo, deadline: float) -> None:
    """The gateway routes to the node: one real completion through the whole platform."""
    body = json.dumps({"model": DEMO_MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    while True:
        request = urllib.request.Request(
            f"{dev.gateway_url}/v1/chat/completions", data=body, method="POST",
            headers={"Authorization": f"Bearer {demo.api_key}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DevError("the gateway never routed to a simulated node; see logs/ "
                           "(orchestrator.log, cloud.log, nodes/)")
        time.sleep(0.3)


def _stop(services: list[Service]) -> None:
    # In reverse: the orchestrator first (no new launches), the cloud next (its nodes drain
    # and deregister while the monitor still listens), the gateway, the rest after.
    for service in reversed(services):
        if service.proc is not None and service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
    for service in reversed(services):
        if service.proc is not None:
            try:
                service.proc.wait(15)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
        if service.log is not None:
            service.log.close()


def banner(dev: DevURLs, demo: Demo, state: Path) -> str:
    return f"""
CrossLogic is running. Ctrl-C stops everything.

  gateway   {dev.gateway_url}      (OpenAI-compatible)
  admin     {dev.admin_url}/admin/v1   (X-Admin-Token: {demo.admin_token})
  logs      {state / 'logs'}/

Try it:

  curl {dev.gateway_url}/v1/chat/completions \\
    -H "Authorization: Bearer {demo.api_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{dev.gateway_url}/v1", api_key="{demo.api_key}")
print(c.chat.completions.create(model="{DEMO_MODEL}",
      messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

In another terminal (the CLI finds this platform by itself while it runs):
  crosslogic events tail
  crosslogic tenants list
"""


def run_dev(state_dir: Path, *, fresh: bool) -> int:
    # Progress goes to stderr in our own words; the libraries only speak up when it matters.
    configure_logging("warning", json=False)
    if fresh and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    _say(f"crosslogic dev: state in {state_dir}")
    stack = DevStack(state_dir, durable=True,
                     ports=PreferredPorts(postgres=55432, redis=56379, nats=54222))
    urls_file = state_dir / URLS_FILE
    services: list[Service] = []
    with stop_on_signals():
        try:
            urls = stack.start()
            _say("  postgres, redis and nats are up")
            demo = asyncio.run(_prepare(urls, state_dir))
            _say("  demo tenant, environment, model and key ready")
            services, dev = _services(urls, demo, state_dir)
            deadline = time.monotonic() + 90
            for service in services:
                _start(service, logs)
            for service in services:
                _wait_ready(service, deadline)
                _say(f"  {service.name} is up")
            _wait_serving(dev, demo, deadline)
            urls_file.write_text(json.dumps(asdict(dev), indent=2))
            urls_file.chmod(0o600)
            _say(f"  a completion went through the whole platform "
                 f"({time.monotonic() - started:.1f}s after start)")
            print(banner(dev, demo, state_dir), flush=True)
            while True:  # until SIGINT/SIGTERM (stop_on_signals raises KeyboardInterrupt)
                signal.pause()
        except KeyboardInterrupt:
            _say("\nstopping …")
        except DevError as exc:
            _say(f"crosslogic dev: {exc}")
            return 1
        finally:
            with contextlib.suppress(OSError):
                urls_file.unlink()
            _stop(services)
            stack.stop()
    _say("stopped cleanly")
    return 0
