-- Projection `usage_records`, second table: usage per tenant, environment, model and UTC hour.
-- The usage_records projection maintains it in the same statement as usage_records, from the
-- rows it actually inserted, so a request counted once there is counted once here (a replayed
-- spool under a new event id adds nothing). Rebuilding usage_records rebuilds both.
CREATE TABLE usage_hourly (
    tenant_id          uuid NOT NULL,
    environment_id     uuid NOT NULL,
    model              text NOT NULL,
    hour               timestamptz NOT NULL,
    requests           bigint NOT NULL,
    prompt_tokens      bigint NOT NULL,
    completion_tokens  bigint NOT NULL,
    cost               numeric(24, 9) NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, hour, environment_id, model)
);
-- The Stripe pusher scans a window of closed hours.
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

-- Usage recorded before this table existed: the projection's checkpoint is already past it.
INSERT INTO usage_hourly (tenant_id, environment_id, model, hour, requests, prompt_tokens,
                          completion_tokens, cost)
SELECT tenant_id, environment_id, model, date_trunc('hour', occurred_at, 'UTC'), count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(cost)
FROM usage_records
GROUP BY 1, 2, 3, 4;
