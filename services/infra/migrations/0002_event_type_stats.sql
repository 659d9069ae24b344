-- Projection `event_type_stats`: how many events of each type the log holds, and the latest.
CREATE TABLE event_type_stats (
    type              text PRIMARY KEY,
    events            bigint NOT NULL,
    last_position     bigint NOT NULL,
    last_recorded_at  timestamptz NOT NULL
);
