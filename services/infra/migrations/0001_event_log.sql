-- The event log: every fact of the platform, once, in order. Projections are built from it.

CREATE TABLE streams (
    stream  text PRIMARY KEY,
    version bigint NOT NULL CHECK (version > 0)
);
COMMENT ON TABLE streams IS
    'Current version of each stream; its row lock serializes appends to one stream.';

CREATE TABLE events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    stream         text NOT NULL,
    stream_version bigint NOT NULL CHECK (stream_version > 0),
    type           text NOT NULL,
    data           jsonb NOT NULL,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Readers order by (transaction_id, position) and stop below the oldest running
    -- transaction, so an event whose transaction commits late is waited for, never skipped.
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- 'log': appended here first, the outbox relay publishes it to NATS.
    -- 'bus': arrived over NATS first and was recorded; it is not published again.
    origin         text NOT NULL DEFAULT 'log' CHECK (origin IN ('log', 'bus')),
    UNIQUE (stream, stream_version)
);

CREATE INDEX events_log_order ON events (transaction_id, position);
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE FUNCTION events_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only (% on events)', TG_OP;
END $$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_immutable();

-- One wake-up per appending transaction (identical notifications fold into one at commit).
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crosslogic_events', '');
    RETURN NULL;
END $$;

CREATE TRIGGER events_wake_readers AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- Where each reader of the log (projection, outbox relay) has got to.
CREATE TABLE checkpoints (
    name           text PRIMARY KEY,
    transaction_id xid8 NOT NULL DEFAULT '0',
    position       bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
