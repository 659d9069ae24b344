"""What Stripe knows each billing event by (`billing_events.stripe_id`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from schemas.events import (
    InvoicePaid,
    MeterErrorReported,
    StripeCustomerLinked,
    SubscriptionChanged,
    UsageExported,
    UsageExportPlanned,
)
from services.domain.billing_ledger import stripe_id_of

TENANT = uuid.UUID(int=7)
HOUR = datetime(2026, 12, 4, 10, tzinfo=UTC)


def test_webhook_events_go_by_stripe_s_event_id() -> None:
    assert stripe_id_of(InvoicePaid(tenant_id=TENANT, invoice_id="in_1", amount_paid=5,
                                    currency="usd", stripe_event_id="evt_1")) == "evt_1"
    assert stripe_id_of(SubscriptionChanged(tenant_id=TENANT, subscription_id="sub_1",
                                            status="active", stripe_event_id="evt_2")) == "evt_2"
    assert stripe_id_of(MeterErrorReported(meter_id="mtr_1", stripe_event_id="evt_3")) == "evt_3"


def test_a_link_goes_by_its_customer() -> None:
    assert stripe_id_of(StripeCustomerLinked(tenant_id=TENANT, customer_id="cus_1",
                                             subscription_id="sub_1")) == "cus_1"


def test_meter_events_go_by_their_identifier_not_the_customer() -> None:
    planned = UsageExportPlanned(tenant_id=TENANT, meter="input", event_name="tokens_in",
                                 hour=HOUR, value=10, identifier="t-7-input-h", sequence=0,
                                 customer_id="cus_1")
    assert stripe_id_of(planned) == "t-7-input-h"
    # An export recorded before the customer was known (empty) still has its identifier.
    assert stripe_id_of(UsageExported(tenant_id=TENANT, meter="input", hour=HOUR, value=10,
                                      identifier="t-7-input-h")) == "t-7-input-h"
