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
import importlib.util
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
from types import FrameType
from typing import IO, Any

import asyncpg

from services.domain.catalog import Catalog
from services.infra.bus import Bus
from services.infra.db import create_pool
from services.infra.devstack import (
    DevStack,
    DevStackError,
    NatsServer,
    PreferredPorts,
    StackURLs,
    free_port,
    stop_on_signals,
)
from services.infra.eventlog import EventLog
from services.infra.logging import configure_logging
from services.infra.migrate import migrate
from services.infra.natsauth.identities import Role
from services.infra.processes import die_with_parent

DEFAULT_STATE_DIR = Path(".state/dev")
URLS_FILE = "urls.json"
DEMO_FILE = "demo.json"
NODE_KEY_SECRET_FILE = "node-api-key.secret"
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


async def _prepare(urls: StackURLs, state: Path, nats: NatsServer) -> tuple[Demo, list[str]]:
    """Migrations, streams and the demo data; with what stands in the demo's way (a
    suspended tenant, a deleted deployment: an operator's doing, kept across runs)."""
    applied = await migrate(urls.database_url)
    _say(f"  migrations applied: {len(applied)}")
    bus = await Bus.connect(urls.nats_url, name="crosslogic-dev",
                            creds=nats.creds(Role.PROVISIONER))
    try:
        await bus.ensure_streams()
    finally:
        await bus.close()
    demo = await _demo_data(urls.database_url, state)
    pool = await create_pool(urls.database_url, min_size=1, max_size=1)
    try:
        return demo, await demo_problems(pool, demo)
    finally:
        await pool.close()


async def demo_problems(db: asyncpg.Pool[asyncpg.Record], demo: Demo) -> list[str]:
    """Why the demo key cannot get a completion, each with the command that fixes it."""
    problems: list[str] = []
    tenant = await db.fetchrow("SELECT status, status_reason FROM tenants WHERE id = $1::uuid",
                               demo.tenant_id)
    if tenant is not None and tenant["status"] != "active":
        why = f" ({tenant['status_reason']})" if tenant["status_reason"] else ""
        problems.append(f"the demo tenant {demo.tenant_id} is {tenant['status']}{why}: "
                        f"`crosslogic tenants reactivate {demo.tenant_id}`")
    env = await db.fetchval("SELECT status FROM environments WHERE id = $1::uuid",
                            demo.environment_id)
    if env is not None and env != "active":
        problems.append(f"the demo environment {demo.environment_id} is {env}: "
                        f"`crosslogic environments update {demo.environment_id} "
                        f"--status active`")
    model = await db.fetchrow("SELECT id, status FROM models WHERE name = $1", DEMO_MODEL)
    if model is None or model["status"] != "active":
        state = "not in the catalog" if model is None else model["status"]
        problems.append(f"the demo model {DEMO_MODEL} is {state}"
                        + ("" if model is None else
                           f": `crosslogic models update {model['id']} --status active`"))
    elif not await db.fetchval("SELECT 1 FROM deployments WHERE model_name = $1 "
                               "AND status = 'active'", DEMO_MODEL):
        problems.append(f"there is no deployment of {DEMO_MODEL} (the demo one was deleted), "
                        f"so no GPU node is launched: `crosslogic deployments create --model "
                        f"{DEMO_MODEL} --region local --gpu-type simulated --min 1 --max 2`")
    return problems


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


def node_key_secret(state: Path) -> str:
    """NODE_API_KEY_SECRET of this state folder, made on first use: the gateway derives each
    node's vLLM key from it, the orchestrator hands each node its key (the same secret)."""
    path = state / NODE_KEY_SECRET_FILE
    try:
        secret = path.read_text().strip()
    except OSError:
        secret = ""
    if not secret:
        secret = secrets.token_urlsafe(48)
        # Local dev state only: the folder is git-ignored and yours.
        path.write_text(secret + "\n")
        path.chmod(0o600)
    return secret


def _services(urls: StackURLs, demo: Demo, state: Path,
              nats: NatsServer) -> tuple[list[Service], DevURLs]:
    py = sys.executable
    node_keys = node_key_secret(state)
    base = {**os.environ, "DATABASE_URL": urls.database_url, "REDIS_URL": urls.redis_url,
            "NATS_URL": urls.nats_url, "HTTP_HOST": "127.0.0.1", "LOG_LEVEL": "info",
            "LOG_JSON": "true", "EVENT_POLL_INTERVAL": "0.5"}

    def as_(role: Role) -> dict[str, str]:
        """Each service connects to NATS as its own identity, as in production."""
        return {**base, "NATS_CREDS": nats.creds(role)}

    ports = {name: free_port(preferred) for name, preferred in
             (("gateway", 8080), ("admin", 8081), ("monitor", 8082), ("billing", 8083),
              ("orchestrator", 8085), ("notifier", 8084), ("relay", 8079), ("cloud", 8090))}
    cloud = f"http://127.0.0.1:{ports['cloud']}"
    services = [
        Service("relay", [py, "-m", "services.cli", "relay"],
                {**as_(Role.RELAY), "HTTP_PORT": str(ports["relay"])},
                f"http://127.0.0.1:{ports['relay']}/ready"),
        Service("monitor", [py, "-m", "services.monitor"],
                {**as_(Role.MONITOR), "HTTP_PORT": str(ports["monitor"])},
                f"http://127.0.0.1:{ports['monitor']}/ready"),
        Service("billing", [py, "-m", "services.billing"],
                {**as_(Role.BILLING), "HTTP_PORT": str(ports["billing"])},
                f"http://127.0.0.1:{ports['billing']}/ready"),
        Service("notifier", [py, "-m", "services.notifier"],
                {**as_(Role.NOTIFIER), "HTTP_PORT": str(ports["notifier"]),
                 # Local webhook receivers are the point of a local run.
                 "ALLOW_PRIVATE_TARGETS": "true"},
                f"http://127.0.0.1:{ports['notifier']}/ready"),
        Service("admin", [py, "-m", "services.admin"],
                {**as_(Role.ADMIN_API), "HTTP_PORT": str(ports["admin"]),
                 "ADMIN_TOKEN": demo.admin_token},
                f"http://127.0.0.1:{ports['admin']}/ready"),
        Service("gateway", [py, "-m", "services.gateway"],
                {**as_(Role.GATEWAY), "HTTP_PORT": str(ports["gateway"]),
                 "NODE_API_KEY_SECRET": node_keys,
                 "USAGE_SPOOL_DIR": str(state / "usage-spool")},
                f"http://127.0.0.1:{ports['gateway']}/ready"),
        Service("cloud", [py, "-m", "agent.local_cloud", "--port", str(ports["cloud"]),
                          "--log-dir", str(state / "logs" / "nodes"),
                          "--simulator-args", "--ttft 0.05 --itl 0.01",
                          "--agent-env", "LOG_JSON=true"],
                dict(os.environ), f"{cloud}/clusters"),
        Service("orchestrator", [py, "-m", "services.orchestrator"],
                {**as_(Role.ORCHESTRATOR), "HTTP_PORT": str(ports["orchestrator"]),
                 "NATS_NODE_ISSUER": nats.authority.node_issuer().to_json(), "LAUNCHER": "local",
                 "NODE_API_KEY_SECRET": node_keys,
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
            _say(f"  waiting for the simulated GPU node ({now - began:.0f}s): "
                 f"{nodes_summary(dev)}; {last}")
            next_note = now + note_every
        time.sleep(0.3)


class Stopping:
    """Once shutdown has begun, Ctrl-C and SIGTERM no longer interrupt it (an interrupted
    shutdown would leave the servers running until we exit): the next one only hurries it —
    services still running are killed instead of waited for — and the servers are stopped
    all the same."""

    def __init__(self) -> None:
        self.begun = False
        self.hurry = False

    def begin(self) -> None:
        if self.begun:
            return
        self.begun = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._again)

    def _again(self, signum: int, frame: FrameType | None) -> None:
        if not self.hurry:
            self.hurry = True
            _say("  stopping faster: killing the services that are left, then stopping the "
                 "servers")


def _stop(services: list[Service], stopping: Stopping, grace: float = 15.0) -> None:
    # In reverse: the orchestrator first (no new launches), the cloud next (its nodes drain
    # and deregister while the monitor still listens), the gateway, the rest after.
    for service in reversed(services):
        if service.proc is not None and service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
    for service in reversed(services):
        if service.proc is not None:
            deadline = time.monotonic() + grace
            while service.proc.poll() is None:
                if stopping.hurry or time.monotonic() > deadline:
                    service.proc.kill()
                    service.proc.wait()
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.proc.wait(0.1)
        if service.log is not None:
            service.log.close()


def python_command() -> str:
    """This interpreter as a user would type it: `.venv/bin/python` from the project folder
    (not resolved: the venv's python is a link to the system one, without the venv)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def cli_command() -> str:
    """`crosslogic` as a user can run it: the venv's script, which `make dev` does not put on
    the PATH."""
    script = Path(python_command()).parent / "crosslogic"
    return str(script) if script.parent != Path(".") and script.exists() else "crosslogic"


def _write_urls(urls_file: Path, dev: DevURLs) -> None:
    partial = urls_file.with_name(urls_file.name + ".partial")
    partial.write_text(json.dumps(asdict(dev), indent=2))
    partial.chmod(0o600)
    partial.replace(urls_file)  # readers never see half a file


def banner(dev: DevURLs, demo: Demo, state: Path, problems: list[str] | None = None) -> str:
    python = python_command()
    cli = cli_command()
    heads_up = ""
    if problems:
        heads_up = ("\nHeads-up: the demo key cannot get a completion until you fix this "
                    "(or start over with --fresh):\n"
                    + "".join(f"  - {p}\n" for p in problems))
    install = ""
    if importlib.util.find_spec("openai") is None:
        install = f"  {python} -m pip install openai    # the SDK, once\n"
    return f"""
CrossLogic is running. Ctrl-C stops everything.

  gateway   {dev.gateway_url}      (OpenAI-compatible)
  admin     {dev.admin_url}/admin/v1   (X-Admin-Token: {demo.admin_token})
  console   {dev.admin_url}/console   (sign in with the admin token above)
  postgres  {dev.database_url}
  redis     {dev.redis_url}
  nats      {dev.nats_url}   (credentials: {state / 'nats' / 'auth' / 'creds'}/)
  logs      {state / 'logs'}/
{heads_up}
Try it:

  curl {dev.gateway_url}/v1/chat/completions \\
    -H "Authorization: Bearer {demo.api_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

{install}  {python} -c 'from openai import OpenAI
c = OpenAI(base_url="{dev.gateway_url}/v1", api_key="{demo.api_key}")
print(c.chat.completions.create(model="{DEMO_MODEL}",
      messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

In another terminal (the CLI finds this platform by itself while it runs):
  {cli} events tail
  {cli} tenants list
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
    _say(f"crosslogic dev: state in {state_dir}" + (" (fresh)" if fresh else ""))
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
            _write_urls(urls_file, DevURLs(urls.database_url, urls.redis_url, urls.nats_url))
            wrote_urls = True
            _say(f"  postgres  {urls.database_url}\n  redis     {urls.redis_url}\n"
                 f"  nats      {urls.nats_url}")
            assert stack.nats is not None
            demo, problems = asyncio.run(_prepare(urls, state_dir, stack.nats))
            _say("  demo tenant, environment, model and key ready")
            services, dev = _services(urls, demo, state_dir, stack.nats)
            deadline = time.monotonic() + 90
            for service in services:
                _start(service, logs)
            for service in services:
                _wait_ready(service, deadline)
                _say(f"  {service.name} is up")
            _write_urls(urls_file, dev)
            if problems:
                for problem in problems:
                    _say(f"  not waiting for a completion: {problem}")
            else:
                _wait_serving(dev, demo, deadline)
                _say(f"  a completion went through the whole platform "
                     f"({time.monotonic() - started:.1f}s after start)")
            print(banner(dev, demo, state_dir, problems), flush=True)
            while True:  # until SIGINT/SIGTERM (stop_on_signals raises KeyboardInterrupt)
                signal.pause()
        except KeyboardInterrupt:
            stopping.begin()
            _say("\nstopping … (Ctrl-C again to hurry)")
        except (DevError, DevStackError) as exc:
            stopping.begin()
            _say(f"crosslogic dev: {exc}")
            code = 1
        finally:
            stopping.begin()
            if wrote_urls:
                with contextlib.suppress(OSError):
                    urls_file.unlink()
            _stop(services, stopping)
            stack.stop()
    _say("stopped cleanly" if code == 0 else "stopped")
    return code
