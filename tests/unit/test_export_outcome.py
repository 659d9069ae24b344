"""The one mapping of Stripe's answer to a meter export's outcome (issue 18: billing's pusher
and the admin's settle share it). Pure, on the stripe library's own errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import stripe

from services.billing.export_outcome import exported, failed

TENANT = uuid.UUID(int=1)


@dataclass(frozen=True)
class Held:
    meter: str = "cost"
    hour: datetime = datetime(2026, 12, 1, 10, tzinfo=UTC)
    value: int = 1234
    identifier: str = "ident"
    sequence: int = 2
    customer_id: str | None = None


def test_exported_carries_the_export_and_whether_stripe_already_had_it() -> None:
    event = exported(TENANT, Held(), duplicate=True)
    assert (event.tenant_id, event.meter, event.value, event.identifier, event.sequence,
            event.customer_id, event.duplicate) == (TENANT, "cost", 1234, "ident", 2, "", True)


def test_a_refusal_is_final_and_a_lost_connection_retryable_and_ambiguous() -> None:
    refused = failed(TENANT, Held(), stripe.InvalidRequestError("bad customer", "customer",
                                                                 http_status=400))
    assert (refused.retryable, refused.ambiguous, refused.value) == (False, False, 1234)
    assert "bad customer" in refused.error
    lost = failed(TENANT, Held(), stripe.APIConnectionError("reset by peer"))
    assert (lost.retryable, lost.ambiguous) == (True, True)
