-- The notifier's delivery state: operational, not projections (what was sent, when, and how
-- it went is the notifier's own record; the log gets an event only when something needs a
-- human: notification.delivery_failed, notification.endpoint_disabled).

-- One row per subscription and event: the unique key is the idempotency on event id (NATS
-- redeliveries, a notifier restarted, replicas racing: the event is queued once).
CREATE TABLE notification_deliveries (
    id                uuid PRIMARY KEY,
    subscription_id   uuid NOT NULL,
    event_id          uuid NOT NULL,
    event_type        text NOT NULL,
    event_occurred_at timestamptz NOT NULL,
    event             jsonb NOT NULL,         -- the event as on NATS, sensitive fields removed
    status            text NOT NULL,          -- pending | delivered | failed | cancelled
    attempts          integer NOT NULL DEFAULT 0,  -- requests made
    failures          integer NOT NULL DEFAULT 0,  -- place in the retry schedule (429s do not count)
    next_attempt_at   timestamptz NOT NULL,
    lease_until       timestamptz,            -- a replica is sending it until then
    lease_token       uuid,
    last_status_code  integer,
    last_error        text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    UNIQUE (subscription_id, event_id)
);
-- The scheduler's question: each endpoint's oldest pending delivery, in event order.
CREATE INDEX notification_deliveries_queue ON notification_deliveries
    (subscription_id, event_occurred_at, event_id) WHERE status = 'pending';
CREATE INDEX notification_deliveries_subscription ON notification_deliveries (subscription_id, id);

-- The delivery log: every request made, how it went.
CREATE TABLE notification_attempts (
    id                uuid PRIMARY KEY,
    delivery_id       uuid NOT NULL,
    subscription_id   uuid NOT NULL,
    attempt           integer NOT NULL,
    started_at        timestamptz NOT NULL,
    latency_ms        double precision NOT NULL,
    status_code       integer,
    outcome           text NOT NULL,   -- delivered | rate_limited | failed | gone | refused
    error             text NOT NULL DEFAULT '',
    response_excerpt  text NOT NULL DEFAULT ''
);
CREATE INDEX notification_attempts_delivery ON notification_attempts (delivery_id, id);
CREATE INDEX notification_attempts_subscription ON notification_attempts (subscription_id, id);

-- Per endpoint (= per subscription): when it may be sent to again (its rate, a 429's
-- Retry-After) and since when it has been failing without a success in between.
CREATE TABLE notification_endpoints (
    subscription_id   uuid PRIMARY KEY,
    next_send_at      timestamptz NOT NULL DEFAULT '-infinity',
    failing_since     timestamptz,
    last_success_at   timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
