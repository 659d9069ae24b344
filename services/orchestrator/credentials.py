"""Node credentials: minted at launch, revoked when the node ends.

The decisions are pure: `plan_revocations` (what to revoke, put back and forget, given what
the servers hold) and `needs_sync` (whether to talk to NATS this tick). `CredentialKeeper`
does the I/O as the leader: it reads which nodes have ended, looks up the account's JWT on
the servers, and pushes it back with the ended nodes' keys revoked (their connections close
within the push) and the revocations of long-expired credentials forgotten.

- A credential is revoked at its own expiry time. Each key signs one JWT, issued before it
  expires, so that time covers it; and it never changes, so a verification finds nothing to
  push (a revocation "at now" would be re-pushed every minute, and every push makes the
  servers re-check every connection of the account), whatever the clocks of the leaders that
  minted and revoked it say.
- It is forgotten `forget_after` past that expiry (an expired JWT is refused anyway; the
  margin covers the servers' clocks being behind ours), so the account JWT does not grow for
  ever. Only node credentials are ever forgotten: an operator's `crosslogic nats revoke` of a
  service credential stays.
- Pushes race: `crosslogic nats revoke` looks up, changes and pushes the same account JWT, and
  the last push wins. So every push is verified (looked up again; what is missing of what was
  wanted is merged and pushed again, a bounded number of times), and a revocation the keeper
  has seen on the servers is put back if it disappears.
- NATS never holds up the leader: the keeper connects in the background, skips while it is
  not connected, and bounds each exchange (`nats_timeout`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.domain.node_states import FINAL
from services.infra.aio import stop_task
from services.infra.bus import Bus
from services.infra.nats_connection import NatsAuthError
from services.infra.natsauth.authority import (
    AUTH_ERROR_ADVISORIES,
    NodeIssuer,
    disconnect_advisories,
)
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.revocations import (
    AccountResolver,
    ResolverError,
    resign,
    revised,
    revocations_of,
)

log = structlog.get_logger("orchestrator.credentials")

__all__ = ["CredentialKeeper", "EndedNode", "RevocationPlan", "needs_sync", "plan_revocations"]

FORGET_AFTER = timedelta(minutes=10)
"""How long past its credential's expiry a revocation is kept."""

NATS_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default max_payload: an account JWT pushed must fit in one message."""

JWT_WARN_BYTES = NATS_MAX_PAYLOAD // 2
"""Above this the keeper warns at each push: ~93 bytes per revoked credential, so about
5,600 revocations, half way to the ~11,000 at which every push fails."""

FINAL_STATUSES = sorted(s.value for s in FINAL)
"""A node in one of these has ended: its credential is revoked."""


@dataclass(frozen=True)
class EndedNode:
    """A node credential the nodes table knows: its public key and when it expires."""

    credential_key: str
    expires_at: datetime | None


@dataclass(frozen=True)
class RevocationPlan:
    revoke: dict[str, int]
    """Keys to add to the servers' revocations (none of them held already), with the time."""
    forget: frozenset[str]
    """Held keys to drop."""


def plan_revocations(ended: Iterable[EndedNode], held: Mapping[str, int],
                     known: Iterable[EndedNode], now: datetime, *,
                     forget_after: timedelta = FORGET_AFTER,
                     seen: Mapping[str, int] | None = None) -> RevocationPlan:
    """What to change in the servers' revocations `held`. Pure.

    - Revoke each `ended` node's credential that has not expired and is not held yet, at its
      expiry time (now, for one without an expiry). A key already held is left as it is.
    - Put back what was `seen` held before and is missing now: a push racing ours (an
      operator's `crosslogic nats revoke`, made from an older lookup) dropped it.
    - Forget held keys that `known` (the node credentials the nodes table has, among the held
      and seen keys) says expired `forget_after` ago or more; those are never put back."""
    cutoff = now - forget_after
    expired = {n.credential_key for n in known
               if n.credential_key and n.expires_at is not None and n.expires_at <= cutoff}
    revoke: dict[str, int] = {}
    for node in ended:
        key = node.credential_key
        if not key or key in held or key in expired:
            continue
        if node.expires_at is None:
            revoke[key] = int(now.timestamp())
        elif node.expires_at > now:
            revoke[key] = int(node.expires_at.timestamp())
    for key, at in (seen or {}).items():
        if key not in held and key not in expired:
            revoke.setdefault(key, at)
    return RevocationPlan(revoke, frozenset(expired & held.keys()))


def needs_sync(assumed: RevocationPlan | None, *, since_verified: float,
               verify_every: float) -> bool:
    """Whether the leader talks to NATS this tick. `assumed` is the plan made against what the
    servers held at the last look (None: not looked yet, as a new leader). Talk when that is
    unknown, when something changed since (a node ended, a revocation may be forgotten), or
    when the look is `verify_every` seconds old (another push may have dropped ours). Pure."""
    if assumed is None or assumed.revoke or assumed.forget:
        return True
    return since_verified >= verify_every


def node_credentials(issuer: NodeIssuer, node_id: uuid.UUID, ttl_seconds: float,
                     now: datetime) -> tuple[Credentials, datetime]:
    creds = issuer.node_credentials(node_id, ttl_seconds=ttl_seconds, now=now.timestamp())
    return creds, datetime.fromtimestamp(creds.expires_at, UTC)


REFUSALS = {"authentication failure": "authentication_failure",
            "authentication expired": "credentials_expired",
            "credentials revoked": "credentials_revoked",
            "authentication revoked": "credentials_revoked",
            "authentication timeout": "authentication_timeout"}
"""The servers' reasons for refusing or closing a connection, as metric labels."""


def refusal_reason(advisory: bytes, *, refused: bool) -> str | None:
    """The label for a connection advisory; None for a disconnect that was no refusal (a
    client closing, a restart). `refused`: it came on the authentication-error subject, so it
    counts whatever its reason. Pure."""
    try:
        reason = str(json.loads(advisory).get("reason", "")).strip().lower()
    except (ValueError, AttributeError):
        reason = ""
    label = REFUSALS.get(reason)
    if label is None and refused:
        return "other"
    return label


class CredentialMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.refused = Counter("nats_connections_refused_total",
                               "Connections the NATS servers refused or closed for their "
                               "credential: none or forged, expired, revoked", ["reason"],
                               registry=registry)
        for label in sorted(set(REFUSALS.values())):
            self.refused.labels(label)
        self.revoked = Gauge("orchestrator_node_credentials_revoked",
                             "Node credentials revoked and not yet expired", registry=registry)
        self.pushes = Counter("orchestrator_account_pushes_total",
                              "Account JWT updates pushed to NATS (revocations)", ["outcome"],
                              registry=registry)
        for outcome in ("ok", "error"):
            self.pushes.labels(outcome)
        self.jwt_bytes = Gauge("orchestrator_account_jwt_bytes",
                               "Size of the account JWT on the servers (it grows with the "
                               "revocations; a push fails past NATS's max payload, 1 MiB)",
                               registry=registry)


class CredentialKeeper:
    """Keeps the servers' revocations in step with the nodes that have ended. `sync()` is
    called by the leader every tick; it talks to NATS only when something changed, or every
    `verify_every` seconds to see that the servers still hold what was pushed."""

    def __init__(self, issuer: NodeIssuer, nats_url: str, pool: asyncpg.Pool[asyncpg.Record],
                 *, registry: CollectorRegistry | None = None,
                 verify_every: float = 60.0, forget_after: timedelta = FORGET_AFTER,
                 nats_timeout: float = 5.0, max_pushes: int = 3,
                 reconnect_after: float = 30.0, jwt_warn_bytes: int = JWT_WARN_BYTES) -> None:
        self.issuer = issuer
        self.nats_url = nats_url
        self.pool = pool
        self.metrics = CredentialMetrics(registry)
        self.verify_every = verify_every
        self.forget_after = forget_after
        self.nats_timeout = nats_timeout
        """The longest one sync talks to NATS (lookups and pushes together)."""
        self.max_pushes = max_pushes
        """Pushes per sync: the first, then merges after a racing push."""
        self.reconnect_after = reconnect_after
        """After the servers refused the system account's credential, wait this long before
        trying again (the orchestrator's other work goes on meanwhile)."""
        self.jwt_warn_bytes = jwt_warn_bytes
        self._bus: Bus | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._connect_after = 0.0
        self._pushed: dict[str, int] | None = None
        """The servers' revocations at the last verified look (None: not looked yet)."""
        self._verified_at = float("-inf")

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    def start(self) -> None:
        """Start connecting to NATS in the background, unless connected or already trying."""
        if self._bus is not None or self._connecting is not None:
            return
        if time.monotonic() < self._connect_after:
            return
        self._connecting = asyncio.create_task(self._connect(), name="orchestrator-account")

    async def _connect(self) -> None:
        try:
            # Bus.connect waits out an unreachable NATS (this task is in the background) and
            # gives up on a refused credential.
            bus = await Bus.connect(self.nats_url, name="orchestrator-account",
                                    creds=self.issuer.system_creds.text())
            try:
                # The servers' word on refused and revoked connections, as a metric: a node
                # knocking with a revoked credential, or anyone without one, shows there.
                await bus.nc.subscribe(AUTH_ERROR_ADVISORIES, cb=self._on_refused)
                await bus.nc.subscribe(disconnect_advisories(self.issuer.account),
                                       cb=self._on_disconnect)
            except BaseException:
                await bus.close()
                raise
            self._bus = bus
        except NatsAuthError as exc:
            self._connect_after = time.monotonic() + self.reconnect_after
            log.error("NATS refused the system account's credential (NATS_NODE_ISSUER): "
                      "ended nodes' credentials are not revoked", error=str(exc),
                      retry_in=self.reconnect_after)
        except (nats.errors.Error, OSError) as exc:  # closed as it was being set up
            log.warning("could not connect to NATS to revoke node credentials; retrying",
                        error=str(exc) or type(exc).__name__)
        finally:
            self._connecting = None

    async def _drop_closed(self) -> None:
        """A connection closed for good (the servers refused the system user on reconnection)
        is replaced by a new one, not waited on."""
        if self._bus is not None and self._bus.closed.is_set():
            closed, self._bus = self._bus, None
            self._connect_after = time.monotonic() + self.reconnect_after
            await closed.close()

    def resolver(self, nc: NATS) -> AccountResolver:
        """How the servers' account store is reached (a test puts a racing push in here)."""
        return AccountResolver(nc, self.issuer.account, timeout=self.nats_timeout / 2)

    async def _on_refused(self, msg: Msg) -> None:
        label = refusal_reason(msg.data, refused=True)
        if label is not None:
            self.metrics.refused.labels(label).inc()

    async def _on_disconnect(self, msg: Msg) -> None:
        label = refusal_reason(msg.data, refused=False)
        if label is not None:
            self.metrics.refused.labels(label).inc()

    # ------------------------------------------------------------------ the database

    async def _ended(self, now: datetime) -> list[EndedNode]:
        rows = await self.pool.fetch(
            """SELECT credential_key, credential_expires_at FROM nodes
               WHERE credential_key <> '' AND status = ANY($1::text[])
                 AND (credential_expires_at IS NULL OR credential_expires_at > $2)""",
            FINAL_STATUSES, now)
        return [EndedNode(r["credential_key"], r["credential_expires_at"]) for r in rows]

    async def _known(self, keys: Collection[str]) -> list[EndedNode]:
        if not keys:
            return []
        rows = await self.pool.fetch(
            """SELECT credential_key, credential_expires_at FROM nodes
               WHERE credential_key = ANY($1::text[])""", list(keys))
        return [EndedNode(r["credential_key"], r["credential_expires_at"]) for r in rows]

    # ------------------------------------------------------------------ the sync

    async def sync(self, now: datetime | None = None) -> bool:
        """True when the servers were updated. Never waits for NATS: while it is not
        connected this starts connecting and returns False (the next tick tries again)."""
        now = now or datetime.now(UTC)
        ended = await self._ended(now)
        self.metrics.revoked.set(len({n.credential_key for n in ended}))
        assumed = None
        if self._pushed is not None:
            assumed = plan_revocations(ended, self._pushed, await self._known(self._pushed),
                                       now, forget_after=self.forget_after)
        if not needs_sync(assumed, since_verified=time.monotonic() - self._verified_at,
                          verify_every=self.verify_every):
            return False
        await self._drop_closed()
        self.start()
        bus = self._bus
        if bus is None or not bus.connected:
            return False  # connecting, or reconnecting by itself
        try:
            async with asyncio.timeout(self.nats_timeout):
                return await self._converge(self.resolver(bus.nc), ended, now)
        except (ResolverError, nats.errors.Error, OSError, TimeoutError) as exc:
            self.metrics.pushes.labels("error").inc()
            log.warning("could not update the revocations; next tick retries",
                        error=str(exc) or type(exc).__name__)
            return False

    async def _converge(self, resolver: AccountResolver, ended: list[EndedNode],
                        now: datetime) -> bool:
        """Look up, push what is missing, and look up again until the servers hold it all:
        another push (an operator's revocation) landing between our lookup and our push, or
        just after it, takes ours away, or ours takes away theirs."""
        seen = dict(self._pushed or {})
        pushed = False
        for attempt in range(self.max_pushes + 1):
            current = await resolver.lookup()
            self.metrics.jwt_bytes.set(len(current))
            held = revocations_of(current)
            plan = plan_revocations(ended, held, await self._known(held.keys() | seen.keys()),
                                    now, forget_after=self.forget_after, seen=seen)
            wanted = revised(held, plan.revoke, plan.forget)
            if wanted is None:
                self._pushed = held
                self._verified_at = time.monotonic()
                return pushed
            if attempt == self.max_pushes:
                break
            updated = resign(current, wanted, signing_seed=self.issuer.operator_signing_seed,
                             now=int(now.timestamp()))
            await resolver.push(updated)
            self.metrics.pushes.labels("ok").inc()
            self.metrics.jwt_bytes.set(len(updated))
            restored = plan.revoke.keys() & seen.keys()
            log.info("node credentials revoked", revoked=len(plan.revoke) - len(restored),
                     restored=len(restored), forgotten=len(plan.forget),
                     attempt=attempt + 1)
            if len(updated) > self.jwt_warn_bytes:
                log.warning("the account JWT is large: past NATS's max payload every push "
                            "fails (docs/security.md, Known limits)", bytes=len(updated),
                            max_payload=NATS_MAX_PAYLOAD, revocations=len(wanted))
            pushed = True
            seen = wanted
        # Still changing under us after every push: look afresh at the next tick.
        self._pushed = None
        log.warning("the account JWT kept changing while revocations were pushed; next tick "
                    "tries again", pushes=self.max_pushes)
        return pushed

    def forget_state(self) -> None:
        """A new leader asks the servers afresh."""
        self._pushed = None

    async def close(self) -> None:
        if self._connecting is not None:
            await stop_task(self._connecting)
            self._connecting = None
        if self._bus is not None:
            await self._bus.close()
            self._bus = None
