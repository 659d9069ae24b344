"""The platform's services as processes of `crosslogic dev`: what each runs with which
settings, started, waited for until ready and stopped in order (Ctrl-C hurrying it)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from services.cli.dev_demo import Demo
from services.cli.dev_urls import DevURLs
from services.infra.devstack import NatsServer, StackURLs, free_port
from services.infra.natsauth.identities import Role
from services.infra.processes import die_with_parent

NODE_KEY_SECRET_FILE = "node-api-key.secret"


class DevError(RuntimeError):
    """Something of the platform did not come up; the message says what and where to look."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = field(default=None, repr=False)


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


def platform_services(urls: StackURLs, demo: Demo, state: Path,
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


def start_service(service: Service, logs: Path) -> None:
    service.log = open(logs / f"{service.name}.log", "ab")  # noqa: SIM115 - closed in stop_services
    # Own session (Ctrl-C reaches only us; we stop them in order) and death with us, so a
    # killed `crosslogic dev` leaves nothing behind.
    service.proc = subprocess.Popen(service.argv, env=service.env, stdout=service.log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=die_with_parent)


def wait_ready(service: Service, deadline: float) -> None:
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
            say("  stopping faster: killing the services that are left, then stopping the "
                "servers")


def stop_services(services: list[Service], stopping: Stopping, grace: float = 15.0) -> None:
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
