-- Projection `notification_subscriptions`: who hears which events, and where (masked). Same
-- rules as the catalog (0003): `version` is the stream version last applied to the row, so a
-- command applying its event inline and the runner applying it again is a no-op; no foreign
-- keys. A deleted subscription keeps its row (status 'deleted') so its delivery log stays
-- readable.
CREATE TABLE notification_subscriptions (
    id             uuid PRIMARY KEY,
    tenant_id      uuid,            -- NULL: a platform (operator) subscription
    kind           text NOT NULL,   -- discord | slack | email | generic
    target_masked  text NOT NULL,
    event_types    text[] NOT NULL,
    description    text NOT NULL DEFAULT '',
    status         text NOT NULL,   -- active | disabled | deleted
    status_reason  text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    version        bigint NOT NULL
);
CREATE INDEX notification_subscriptions_tenant ON notification_subscriptions (tenant_id, id);

-- Not a projection: what must never be in the log. Webhook URLs embed their token (Discord,
-- Slack), generic endpoints have a signing secret. Written by the command that creates the
-- subscription, in the same transaction as its event; a rebuild of the projection leaves it
-- alone (it is not in the projection's tables), so the rebuilt rows find their targets again.
CREATE TABLE notification_secrets (
    subscription_id  uuid PRIMARY KEY,
    target           text NOT NULL,
    signing_secret   text NOT NULL DEFAULT ''
);
