-- Projection `usage_records`: one row per inference request, priced when billing recorded it.
CREATE TABLE usage_records (
    request_id         text PRIMARY KEY,
    event_id           uuid NOT NULL,
    tenant_id          uuid NOT NULL,
    environment_id     uuid NOT NULL,
    api_key_id         uuid NOT NULL,
    model              text NOT NULL,
    endpoint           text NOT NULL,
    region             text NOT NULL,
    node_id            uuid,
    prompt_tokens      integer NOT NULL,
    completion_tokens  integer NOT NULL,
    total_tokens       integer NOT NULL,
    cost               numeric(24, 9) NOT NULL,
    latency_ms         double precision NOT NULL,
    ttft_ms            double precision,
    status             integer NOT NULL,
    streamed           boolean NOT NULL,
    occurred_at        timestamptz NOT NULL
);
CREATE INDEX idx_usage_records_tenant ON usage_records (tenant_id, occurred_at);
CREATE INDEX usage_records_environment ON usage_records (environment_id, occurred_at);
