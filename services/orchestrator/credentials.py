"""Node credentials: minted at launch, revoked when the node ends.

The plan is pure (`plan_revocations`); `CredentialKeeper` does the I/O as the leader: it reads
which nodes have ended, looks up the account's JWT on the servers, and pushes it back with the
ended nodes' keys revoked (their connections close within the push) and the keys of
credentials that have expired since forgotten (an expired JWT is refused anyway).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.core.natsauth.authority import (
    AUTH_ERROR_ADVISORIES,
    NodeIssuer,
    disconnect_advisories,
)
from services.core.natsauth.creds import Credentials
from services.core.natsauth.revocations import (
    AccountResolver,
    ResolverError,
    resign,
    revised,
    revocations_of,
)

log = structlog.get_logger("orchestrator.credentials")

__all__ = ["CredentialKeeper", "EndedNode", "RevocationPlan", "plan_revocations"]


@dataclass(frozen=True)
class EndedNode:
    credential_key: str
    expires_at: datetime | None


@dataclass(frozen=True)
class RevocationPlan:
    revoke: dict[str, int]
    forget: frozenset[str]


def plan_revocations(ended: Iterable[EndedNode], expired_keys: Iterable[str],
                     now: datetime) -> RevocationPlan:
    """Revoke every ended node's credential that has not expired yet (as of `now`: any JWT
    of that key issued before now is refused); forget `expired_keys`, whose credentials
    cannot be used any more. Pure."""
    at = int(now.timestamp())
    revoke = {n.credential_key: at for n in ended
              if n.credential_key and (n.expires_at is None or n.expires_at > now)}
    return RevocationPlan(revoke, frozenset(expired_keys) - revoke.keys())


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


class CredentialKeeper:
    """Keeps the servers' revocations in step with the nodes that have ended. `sync()` is
    called by the leader every tick; it talks to NATS only when something changed, or every
    `verify_every` seconds to see that the servers still hold what was pushed."""

    def __init__(self, issuer: NodeIssuer, nats_url: str, pool: asyncpg.Pool[asyncpg.Record],
                 *, registry: CollectorRegistry | None = None,
                 verify_every: float = 60.0) -> None:
        self.issuer = issuer
        self.nats_url = nats_url
        self.pool = pool
        self.metrics = CredentialMetrics(registry)
        self.verify_every = verify_every
        self._nc: NATS | None = None
        self._pushed: Mapping[str, int] | None = None
        self._verified_at = 0.0

    async def _resolver(self) -> AccountResolver:
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                self.nats_url, name="orchestrator-account",
                user_credentials=RawCredentials(self.issuer.system_creds.text()),
                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                connect_timeout=2)
            # The servers' word on refused and revoked connections, as a metric: a node
            # knocking with a revoked credential, or anyone without one, shows there.
            await self._nc.subscribe(AUTH_ERROR_ADVISORIES, cb=self._on_refused)
            await self._nc.subscribe(disconnect_advisories(self.issuer.account),
                                     cb=self._on_disconnect)
        return AccountResolver(self._nc, self.issuer.account)

    async def _on_refused(self, msg: Msg) -> None:
        label = refusal_reason(msg.data, refused=True)
        if label is not None:
            self.metrics.refused.labels(label).inc()

    async def _on_disconnect(self, msg: Msg) -> None:
        label = refusal_reason(msg.data, refused=False)
        if label is not None:
            self.metrics.refused.labels(label).inc()

    async def _plan(self, now: datetime) -> RevocationPlan:
        rows = await self.pool.fetch(
            """SELECT credential_key, credential_expires_at FROM nodes
               WHERE credential_key <> '' AND status IN ('terminated', 'failed')
                 AND (credential_expires_at IS NULL OR credential_expires_at > $1)""", now)
        ended = [EndedNode(r["credential_key"], r["credential_expires_at"]) for r in rows]
        expired = []
        if self._pushed:
            expired = [r["credential_key"] for r in await self.pool.fetch(
                """SELECT credential_key FROM nodes WHERE credential_key = ANY($1::text[])
                   AND credential_expires_at <= $2""", list(self._pushed), now)]
        return plan_revocations(ended, expired, now)

    async def sync(self, now: datetime | None = None) -> bool:
        """True when the servers were updated."""
        now = now or datetime.now(UTC)
        plan = await self._plan(now)
        mono = time.monotonic()
        if (self._pushed is not None and mono - self._verified_at < self.verify_every
                and plan.revoke.keys() <= self._pushed.keys()
                and not plan.forget & self._pushed.keys()):
            return False
        try:
            resolver = await self._resolver()
            current = await resolver.lookup()
            have = revocations_of(current)
            wanted = revised(have, plan.revoke, plan.forget)
            if wanted is not None:
                await resolver.push(resign(current, wanted,
                                           signing_seed=self.issuer.operator_signing_seed,
                                           now=int(now.timestamp())))
                self.metrics.pushes.labels("ok").inc()
                log.info("node credentials revoked", revoked=len(plan.revoke.keys() - have.keys()),
                         forgotten=len(plan.forget & have.keys()))
            self._pushed = wanted if wanted is not None else have
            self._verified_at = mono
        except (ResolverError, nats.errors.Error, OSError, TimeoutError) as exc:
            self.metrics.pushes.labels("error").inc()
            log.warning("could not update the revocations; next tick retries",
                        error=str(exc) or type(exc).__name__)
            return False
        self.metrics.revoked.set(len(plan.revoke))
        return wanted is not None

    def forget_state(self) -> None:
        """A new leader asks the servers afresh."""
        self._pushed = None

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(OSError, nats.errors.Error):
                await self._nc.close()
        self._nc = None
