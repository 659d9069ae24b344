"""The rate limiter's metrics, and the outage policies they are labelled by."""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.gateway.ratelimit.limits import Layer

Policy = Literal["local", "allow", "deny"]
POLICIES: tuple[Policy, ...] = ("local", "allow", "deny")


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # No key_id label (the reference document had one): keys are unbounded, and a label
        # per key would grow the registry with every tenant's every key.
        self.exceeded = Counter("rate_limit_exceeded_total",
                                "Requests refused by a rate limit, by layer", ["reason"],
                                registry=registry)
        self.fallback = Counter("rate_limit_fallback_total",
                                "Requests decided without Redis, by policy", ["policy"],
                                registry=registry)
        self.redis_errors = Counter("rate_limit_redis_errors_total",
                                    "Rate limiter calls to Redis that failed", registry=registry)
        # The reference's rate_limit_remaining{key_id}, without the unbounded label: how close
        # allowed requests run to their tightest limit, as a distribution (1 = untouched).
        remaining = Histogram("rate_limit_remaining",
                              "Share of the most constraining limit left after an allowed "
                              "request", ["kind"], registry=registry,
                              buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0))
        self.remaining_requests = remaining.labels("requests")
        self.remaining_tokens = remaining.labels("tokens")
        for layer in Layer:
            if layer is not Layer.UNAVAILABLE:
                self.exceeded.labels(str(layer))
        for policy in POLICIES:
            self.fallback.labels(policy)
        self.budget_drift = Counter(
            "budget_drift_nano_dollars_total",
            "Nano-dollars budget counters were raised by to match billing's records: `seed` "
            "when a counter did not hold its period (its first request of it, a Redis that "
            "lost it), `reconcile` when one held less than billing recorded", ["source"],
            registry=registry)
        for source in ("seed", "reconcile"):
            self.budget_drift.labels(source)
        self.budget_refunds = Counter(
            "budget_expired_refunds_nano_dollars_total",
            "Nano-dollars given back to budgets by reservations whose lease expired unsettled "
            "(their gateway died mid-request), as the reconciler found them", registry=registry)
