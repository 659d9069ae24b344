"""Which Redis primaries the limiter cannot reach now: one record per primary (a single Redis
is one), so while a cluster primary fails over only the tenants whose slots it holds are
decided by the fallback policy; the others stay exact.

A primary that failed is left alone for `cooldown` seconds, then one call probes it while the
others keep falling back; the first call that succeeds ends its outage. One warning when an
outage starts, one info line when it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("ratelimit")

SINGLE = ""
"""The node name of a single Redis."""


@dataclass(slots=True)
class Outage:
    node: str
    down_since: float | None = None
    retry_at: float = 0.0
    probing: bool = False
    fallbacks_before: int = 0


class Outages:
    def __init__(self, *, cooldown: float, policy: str, clock: Callable[[], float],
                 node_of: Callable[[str], str] | None = None,
                 live_nodes: Callable[[], frozenset[str]] | None = None) -> None:
        """`node_of(key)`: the primary serving `key` now (None: one Redis); `live_nodes`:
        the primaries the cluster has now, so a node that left (its replica took over) no
        longer counts as down."""
        self._cooldown = cooldown
        self._policy = policy
        self._clock = clock
        self._node_of = node_of
        self._live_nodes = live_nodes
        self._single = Outage(SINGLE)
        self._by_node: dict[str, Outage] = {}
        self.fallbacks = 0
        """Requests decided without Redis, ever (the limiter counts them)."""

    def of(self, key: str) -> Outage:
        if self._node_of is None:
            return self._single
        node = self._node_of(key)
        found = self._by_node.get(node)
        if found is None:
            found = self._by_node[node] = Outage(node)
        return found

    def is_down(self, key: str) -> bool:
        return self.of(key).down_since is not None

    @property
    def degraded(self) -> bool:
        """Whether some Redis primary in use is unreachable now."""
        if self._node_of is None:
            return self._single.down_since is not None
        live = self._live_nodes() if self._live_nodes is not None else None
        return any(o.down_since is not None and (live is None or o.node in live)
                   for o in self._by_node.values())

    def admit(self, outage: Outage) -> bool | None:
        """Before a call: None to skip it (down, cooling down or being probed), else whether
        it is the probe (then `done` must follow)."""
        if outage.down_since is None:
            return False
        if outage.probing or self._clock() < outage.retry_at:
            return None
        outage.probing = True
        return True

    def done(self, outage: Outage) -> None:
        outage.probing = False

    def failed(self, outage: Outage, exc: BaseException) -> None:
        now = self._clock()
        outage.retry_at = now + self._cooldown
        if outage.down_since is None:
            outage.down_since = now
            outage.fallbacks_before = self.fallbacks
            log.warning("rate limiter cannot reach redis; falling back to its policy",
                        policy=self._policy, **_node(outage), error=type(exc).__name__,
                        detail=str(exc)[:200], cooldown=self._cooldown)

    def recovered(self, outage: Outage) -> None:
        if outage.down_since is None:
            return
        log.info("rate limiter reaches redis again", policy=self._policy, **_node(outage),
                 outage_seconds=round(self._clock() - outage.down_since, 3),
                 decided_without_redis=self.fallbacks - outage.fallbacks_before)
        outage.down_since = None


def _node(outage: Outage) -> dict[str, str]:
    return {"node": outage.node} if outage.node else {}
