"""What a meter event sent to Stripe ends as, in the billing log: the one mapping of Stripe's
answer to `UsageExported` / `UsageExportFailed`, used by the pusher and by its leader's
settling of a held export on an operator's command (settle.py). Pure."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Protocol

import stripe

from schemas.events import UsageExported, UsageExportFailed
from services.domain.stripe_billing import Failure, classify, describe, may_have_reached


class Export(Protocol):
    """A meter export as the pusher plans it or the ledger holds it."""

    @property
    def meter(self) -> str: ...
    @property
    def hour(self) -> datetime: ...
    @property
    def value(self) -> int: ...
    @property
    def identifier(self) -> str: ...
    @property
    def sequence(self) -> int: ...
    @property
    def customer_id(self) -> str | None: ...


def exported(tenant_id: uuid.UUID, export: Export, *, duplicate: bool) -> UsageExported:
    """Stripe has it: sent now, or (`duplicate`) it already had the identifier."""
    return UsageExported(tenant_id=tenant_id, meter=export.meter, hour=export.hour,
                         value=export.value, identifier=export.identifier,
                         sequence=export.sequence, customer_id=export.customer_id or "",
                         duplicate=duplicate)


def failed(tenant_id: uuid.UUID, export: Export, exc: stripe.StripeError) -> UsageExportFailed:
    """Stripe did not take it: retryable unless it refused for good, and ambiguous when the
    attempt may have reached it all the same."""
    return UsageExportFailed(tenant_id=tenant_id, meter=export.meter, hour=export.hour,
                             identifier=export.identifier, error=describe(exc),
                             retryable=classify(exc) is not Failure.PERMANENT,
                             value=export.value, ambiguous=may_have_reached(exc))
