"""What the usage recorder records (a `BatchTransform`, run inside its transaction): each
`usage.recorded` checked (usage_checks.py: plausible counts, ids that exist and belong
together) and priced from the catalog; what fails is refused (dead letters, counted in
`billing_usage_refused_total{reason}`), the rest of the batch is recorded. The catalog is asked
at most once per batch for key owners and once for prices, never per record."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas.events import Event, UsageRecorded
from services.billing.key_owners import KeyOwners
from services.billing.prices import PriceBook, UnknownModel
from services.billing.usage_checks import UsageRefused, UsageRefusedBecause, check_usage
from services.infra.db import Connection
from services.infra.recorder import Refusal, Verdict

log = structlog.get_logger("billing.intake")


class IntakeMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.refused = Counter("billing_usage_refused_total",
                               "Usage records billing refused (parked in the dead letters): "
                               "implausible token counts, unknown or mismatched tenant, "
                               "environment or key ids, a model without a price",
                               ["reason"], registry=registry)
        for because in UsageRefusedBecause:
            self.refused.labels(because.value)


class UsageIntake:
    def __init__(self, prices: PriceBook, *, max_tokens: int,
                 owners: KeyOwners | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.prices = prices
        self.max_tokens = max_tokens
        self.owners = owners or KeyOwners()
        self.metrics = IntakeMetrics(registry)

    async def __call__(self, events: Sequence[Event], conn: Connection) -> list[Verdict]:
        owners = await self.owners.of(
            conn, {e.api_key_id for e in events if isinstance(e, UsageRecorded)})
        checked = [(e, check_usage(e, owners.get(e.api_key_id), self.max_tokens))
                   if isinstance(e, UsageRecorded) else (e, None) for e in events]
        # Only the models of usage that passed: a record refused already costs no lookup.
        await self.prices.prepare({e.model for e, refused in checked
                                   if isinstance(e, UsageRecorded) and refused is None}, conn)
        verdicts: list[Verdict] = []
        for e, refused in checked:
            if not isinstance(e, UsageRecorded):
                verdicts.append(())
                continue
            if refused is None:
                try:
                    verdicts.append((self.prices.price(e),))
                    continue
                except UnknownModel as exc:
                    refused = UsageRefused(UsageRefusedBecause.UNKNOWN_MODEL, str(exc))
            self.metrics.refused.labels(refused.because.value).inc()
            log.warning("usage refused", reason=refused.reason, tenant_id=str(e.tenant_id),
                        request_id=e.request_id)
            verdicts.append(Refusal(refused.reason))
        return verdicts
