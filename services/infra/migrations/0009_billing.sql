-- Projection `billing_events` (of the billing.* events) keeps three tables:
--   billing_events    every billing event, per tenant: the feed operators read
--   billing_accounts  a tenant's Stripe customer, subscription and payment standing
--   meter_exports     each meter event planned for Stripe, and what became of it
-- Commands (linking a customer, the pusher, webhooks) apply their events inline, and the
-- runner may apply them again: rows keep the stream version they last applied (`version`),
-- and older events change nothing. No foreign keys: projections are rebuilt independently.

CREATE TABLE billing_events (
    event_id     uuid PRIMARY KEY,
    tenant_id    uuid,
    stream       text NOT NULL,
    type         text NOT NULL,
    data         jsonb NOT NULL,
    occurred_at  timestamptz NOT NULL
);
CREATE INDEX billing_events_tenant ON billing_events (tenant_id, occurred_at);

CREATE TABLE billing_accounts (
    tenant_id            uuid PRIMARY KEY,
    customer_id          text,
    subscription_id      text,
    subscription_status  text,
    payment_status       text NOT NULL DEFAULT 'ok',
    payment_flagged_at   timestamptz,
    last_invoice_id      text,
    linked_at            timestamptz,
    updated_at           timestamptz NOT NULL,
    version              bigint NOT NULL
);
CREATE INDEX billing_accounts_customer ON billing_accounts (customer_id);

CREATE TABLE meter_exports (
    identifier    text PRIMARY KEY,
    tenant_id     uuid NOT NULL,
    meter         text NOT NULL,
    event_name    text NOT NULL,
    hour          timestamptz NOT NULL,
    sequence      integer NOT NULL,
    value         bigint NOT NULL,
    customer_id   text,
    status        text NOT NULL,      -- skipped | planned | exported | failed
    duplicate     boolean NOT NULL DEFAULT false,
    error         text,
    stripe_error  text,
    planned_at    timestamptz,
    exported_at   timestamptz,
    updated_at    timestamptz NOT NULL,
    version       bigint NOT NULL
);
CREATE INDEX meter_exports_hour ON meter_exports (hour, tenant_id, meter);
CREATE INDEX meter_exports_planned ON meter_exports (status) WHERE status = 'planned';
CREATE INDEX meter_exports_tenant ON meter_exports (tenant_id, hour);

-- Stripe webhook deliveries already handled (Stripe retries and may deliver twice). Not a
-- projection: it is the webhook handler's own idempotency record.
CREATE TABLE stripe_webhook_events (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    tenant_id    uuid,
    outcome      text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
