"""The orchestrator service: `python -m services.orchestrator` (or `crosslogic serve
orchestrator`). Every replica competes for the lead (a PostgreSQL advisory lock); the leader
reconciles, the others wait to take over."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web
from nats.aio.msg import Msg

from schemas.arrival import mismatch
from schemas.events import EventDecodeError, decode_event
from services.infra.aio import stop_task
from services.infra.http import BUS, EVENTLOG, REDIS, REGISTRY, WAKER, create_app
from services.infra.leadership import Leadership
from services.infra.natsauth.authority import NodeIssuer
from services.infra.node_keys import check_secret
from services.orchestrator.credentials import CredentialKeeper
from services.orchestrator.launcher import Launcher
from services.orchestrator.local_launcher import LocalLauncher
from services.orchestrator.orchestrator import Orchestrator
from services.orchestrator.r2_credentials import (
    R2SettingsError,
    r2_credential_files,
    write_r2_credentials,
)
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.skypilot_launcher import SkyPilotLauncher
from services.orchestrator.skypilot_task import TaskOptions

log = structlog.get_logger("orchestrator")

ORCHESTRATOR_SETTINGS = web.AppKey("orchestrator_settings", OrchestratorSettings)
ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)
LEADERSHIP = web.AppKey("orchestrator_leadership", Leadership)

# What changes a plan: wake the leader at once rather than at its next tick. (Heartbeats do
# not: load is read per tick.)
WAKE_SUBJECTS = ("node.registered.*", "node.status_changed.*", "node.spot_warning.*",
                 "node.draining.*", "node.deregistered.*", "node.terminate_requested.*",
                 "deployment.*.*")


class LauncherError(ValueError):
    pass


LAUNCHERS = ("local", "skypilot")


def r2_files(s: OrchestratorSettings) -> dict[str, str] | None:
    """SkyPilot's R2 credential files from the settings; None when there are none to write
    (the local cloud never reaches R2). Raises LauncherError."""
    if s.launcher != "skypilot":
        return None
    try:
        return r2_credential_files(s.r2_account_id, s.r2_access_key_id.reveal(),
                                   s.r2_secret_access_key.reveal())
    except R2SettingsError as exc:
        raise LauncherError(str(exc)) from None


def make_launcher(s: OrchestratorSettings) -> Launcher:
    if s.launcher == "local":
        return LocalLauncher(s.local_cloud_url, prefix=s.cluster_prefix)
    if s.launcher == "skypilot":
        files = r2_files(s)
        if files is not None:
            try:
                write_r2_credentials(Path.home(), files)
            except OSError as exc:  # the path and the reason; the content never
                raise LauncherError(f"could not write SkyPilot's R2 credentials: {exc}") \
                    from None
            log.info("R2 credentials written for SkyPilot", files=sorted(files))
        return SkyPilotLauncher(prefix=s.cluster_prefix, max_concurrent=s.max_concurrent_launches,
                                options=TaskOptions(agent_install=s.skypilot_agent_install,
                                                    vllm_version=s.skypilot_vllm_version,
                                                    disk_size_gb=s.skypilot_disk_size_gb))
    raise LauncherError(f"LAUNCHER must be one of {', '.join(LAUNCHERS)}, not {s.launcher!r}")


async def _orchestrator_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[ORCHESTRATOR_SETTINGS]
    launcher = make_launcher(s)
    bus = app[BUS]
    issuer = NodeIssuer.from_json(s.nats_node_issuer.reveal())
    credentials = CredentialKeeper(issuer, s.nats_url.reveal(), app[EVENTLOG].pool,
                                   registry=app[REGISTRY])
    orchestrator = Orchestrator(s, eventlog=app[EVENTLOG], redis=app[REDIS], nc=bus.nc,
                                launcher=launcher, registry=app[REGISTRY], waker=app[WAKER],
                                issuer=issuer, credentials=credentials)
    app[ORCHESTRATOR] = orchestrator
    leadership = Leadership(s.database_url.reveal(), "orchestrator",
                            retry=s.leader_retry_seconds)
    app[LEADERSHIP] = leadership

    async def wake(msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError:
            orchestrator.wake.set()
            return
        # Not the event its subject names (a node speaking of another): not worth a look.
        if mismatch(event, msg.subject) is None:
            orchestrator.observe(event)

    subs = [await bus.nc.subscribe(subject, cb=wake) for subject in WAKE_SUBJECTS]
    task = asyncio.create_task(leadership.run(orchestrator.lead), name="orchestrator-leader")
    yield
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    try:
        await stop_task(task)
    finally:
        await launcher.close()
        await credentials.close()


def node_nats_url_error(launcher: str, node_nats_url: str, nats_url: str) -> str | None:
    """Why nodes may not be launched with this NATS URL, or None. Nodes of a real cloud reach
    NATS across the internet: without TLS their credential's nonce signature and everything
    they say travel in clear, and someone in the middle can speak as them. The local launcher
    starts nodes on this machine, so it is exempt. Pure."""
    if launcher == "local":
        return None
    url = node_nats_url or nats_url
    if urllib.parse.urlsplit(url).scheme != "tls":
        return (f"LAUNCHER={launcher} needs NODE_NATS_URL (or NATS_URL) to be tls://…: nodes "
                "in public clouds must reach NATS over TLS (docs/security.md)")
    return None


def create_orchestrator_app(settings: OrchestratorSettings) -> web.Application:
    if settings.launcher not in LAUNCHERS:  # fail at start, not at the first tick
        raise LauncherError(f"LAUNCHER must be one of {', '.join(LAUNCHERS)}, "
                            f"not {settings.launcher!r}")
    # The message never shows the URL: it may carry a user and password.
    problem = node_nats_url_error(settings.launcher, settings.node_nats_url.reveal(),
                                  settings.nats_url.reveal())
    if problem is not None:
        raise LauncherError(problem)
    # Fail at start too: without it no launched node could connect, or be revoked.
    NodeIssuer.from_json(settings.nats_node_issuer.reveal())
    check_secret(settings.node_api_key_secret.reveal())  # nor be served by the gateways
    r2_files(settings)  # half an R2 configuration fails now, not at the first r2:// launch
    app = create_app(settings)
    app[ORCHESTRATOR_SETTINGS] = settings
    app.cleanup_ctx.append(_orchestrator_ctx)
    return app
