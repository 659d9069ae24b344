"""What the monitor records of the node events it reads from NATS (a `BatchTransform` of the
recorder, run inside the recording transaction).

- What agents say (registration, spot notice, drain, leaving) is recorded once decided on
  (registration.py): a registration only once `decide_registration` accepts it, with the
  `node.accepted` that gateways route by; a notice only from a launched node that has not
  ended (`decide_notice`). The node's events are read under the node's lock
  (services/domain/fleet/lock.py), held until the commit, which the orchestrator's and the
  monitor's own status changes take too: two replicas (or two registrations in one batch)
  cannot both settle a node's address, and a node's end cannot be committed between the read
  and the acceptance (the gateways would route to a node that is over).
- What only the control plane writes (status changes, launches, acceptances: relayed from the
  log) is passed on to the monitor's cache when it is in the log, and never recorded from
  NATS: a copy that is not in the log was not written by the control plane.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas.events import (
    Event,
    NodeDeregistered,
    NodeDraining,
    NodeRegistered,
    NodeSpotWarning,
)
from services.domain.fleet import lock_node
from services.infra.db import Connection
from services.infra.eventlog import EventLog
from services.infra.natsauth.identities import NODE_PUBLISHES
from services.infra.recorder import Refusal, Verdict
from services.monitor.registration import (
    Ignored,
    Notice,
    Refused,
    RefusedBecause,
    decide_notice,
    decide_registration,
)

log = structlog.get_logger("monitor.intake")

NOTICE_TYPES = ("node.spot_warning", "node.draining", "node.deregistered")

Refuse = Callable[[NodeRegistered, str], Awaitable[None]]
"""Tell the agent its registration is refused (it stops asking)."""


class IntakeMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.refused = Counter("monitor_registrations_refused_total",
                               "Node registrations the monitor refused: not launched by the "
                               "control plane, ended, another model or endpoint than settled, "
                               "or unusable", ["reason"], registry=registry)
        for because in RefusedBecause:
            self.refused.labels(because.value)
        self.notices_refused = Counter("monitor_notices_refused_total",
                                       "Spot warnings, drains and deregistrations the monitor "
                                       "refused: from a node the control plane never launched",
                                       ["type", "reason"], registry=registry)
        # Not a refusal: an honest agent's drain or farewell that arrives after the
        # orchestrator ended its node. Kept out of nats_messages_refused_total, whose every
        # increase is an alert (NatsMessagesRefused).
        self.notices_ignored = Counter("monitor_notices_ignored_total",
                                       "Spot warnings, drains and deregistrations acknowledged "
                                       "but not recorded: the node had ended already",
                                       ["type"], registry=registry)
        for type_ in NOTICE_TYPES:
            self.notices_refused.labels(type_, RefusedBecause.NOT_LAUNCHED.value)
            self.notices_ignored.labels(type_)


class NodeIntake:
    def __init__(self, tell_refused: Refuse, *, registry: CollectorRegistry | None = None,
                 metrics: IntakeMetrics | None = None) -> None:
        self.tell_refused = tell_refused
        self.metrics = metrics or IntakeMetrics(registry)

    async def __call__(self, events: Sequence[Event], conn: Connection) -> list[Verdict]:
        histories = await self._histories(
            conn, {e.node_id for e in events
                   if isinstance(e, NodeRegistered | NodeSpotWarning | NodeDraining
                                 | NodeDeregistered)})
        relayed = [e.id for e in events if e.type not in NODE_PUBLISHES]
        in_log: set[uuid.UUID] = set()
        if relayed:
            in_log = {r["event_id"] for r in await conn.fetch(
                "SELECT event_id FROM events WHERE event_id = ANY($1::uuid[])", relayed)}
        verdicts: list[Verdict] = []
        for e in events:
            if isinstance(e, NodeRegistered):
                verdicts.append(await self._registration(e, histories[e.node_id]))
            elif isinstance(e, NodeSpotWarning | NodeDraining | NodeDeregistered):
                verdicts.append(self._notice(e, histories[e.node_id]))
            elif e.type in NODE_PUBLISHES:
                verdicts.append(())  # a heartbeat (not on this stream): never in the log
            elif e.id in in_log:
                verdicts.append((e,))  # the log's own, relayed: for the cache; recorded already
            else:
                log.warning("control-plane event not in the log refused", type=e.type,
                            event_id=str(e.id))
                verdicts.append(Refusal(f"{e.type} is written by the control plane, "
                                        "never taken from NATS"))
        return verdicts

    async def _registration(self, e: NodeRegistered, history: list[Event]) -> Verdict:
        decision = decide_registration(history, e)
        if isinstance(decision, Refused):
            self.metrics.refused.labels(decision.because.value).inc()
            log.warning("registration refused", node_id=str(e.node_id),
                        reason=decision.reason)
            # Dead-lettered all the same (an operator sees it), but the agent is told, or it
            # would publish its registration again for ever.
            await self.tell_refused(e, decision.reason)
            return Refusal(decision.reason)
        # What the next registration of this node in the batch is judged against.
        history.extend((e, decision.event))
        return (e, decision.event)

    def _notice(self, e: Notice, history: list[Event]) -> Verdict:
        decision = decide_notice(history, e)
        if isinstance(decision, Refused):
            self.metrics.notices_refused.labels(e.type, decision.because.value).inc()
            log.warning("notice refused", type=e.type, node_id=str(e.node_id),
                        reason=decision.reason)
            return Refusal(decision.reason)
        if isinstance(decision, Ignored):
            self.metrics.notices_ignored.labels(e.type).inc()
            log.info("notice of an ended node not recorded", type=e.type,
                     node_id=str(e.node_id))
            return ()  # acked: the agent has been heard, and need not say it again
        history.append(e)  # a deregistration ends the node for the rest of the batch
        return (e,)

    @staticmethod
    async def _histories(conn: Connection,
                         nodes: set[uuid.UUID]) -> dict[uuid.UUID, list[Event]]:
        """Each node's events, read under a lock on the node held until the commit. Locks in
        a fixed order: two replicas never wait on each other in a circle."""
        eventlog = EventLog(conn)
        histories: dict[uuid.UUID, list[Event]] = {}
        for node in sorted(nodes):
            await lock_node(conn, node)
            histories[node] = [r.event for r in await eventlog.read_stream(f"node:{node}")]
        return histories
