"""The NATS bus's Prometheus metrics, and the reasons `nats_messages_refused_total` counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

UNDECODABLE = "undecodable"
SUBJECT_MISMATCH = "subject_mismatch"
REFUSED = "refused"
REFUSAL_REASONS = (UNDECODABLE, SUBJECT_MISMATCH, REFUSED)
"""`nats_messages_refused_total`'s reasons: not an event; an event its subject does not name;
an event the receiving service refused (its own metrics say why)."""


class BusMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.refused = Counter("nats_messages_refused_total",
                               "Messages a receiver refused: not an event, not the event its "
                               "subject names, or refused by the service",
                               ["consumer", "reason"], registry=registry)
        self.published = Counter("nats_published_total", "Messages published to NATS",
                                 ["stream"], registry=registry)
        self.consumed = Counter("nats_consumed_total", "Messages handled by a consumer",
                                ["consumer", "outcome"], registry=registry)
        self.pending = Gauge("nats_consumer_pending_messages",
                             "Messages a durable consumer has not settled: not yet delivered "
                             "(num_pending) plus delivered and not acknowledged "
                             "(num_ack_pending)", ["stream", "consumer"], registry=registry)

