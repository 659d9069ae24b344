-- Tenants see their cost per model and region (GET /v1/usage, the admin API's /usage), and the
-- usage reports read whole hours from usage_hourly: it gets the region usage_records has, and
-- becomes one row per tenant, environment, model, region and UTC hour.
ALTER TABLE usage_hourly ADD COLUMN region text;
ALTER TABLE usage_hourly DROP CONSTRAINT usage_hourly_pkey;

-- Its rows so far add every region of an hour together and cannot be split, so they are
-- rebuilt from usage_records, which usage_hourly only ever adds up (the projection writes
-- both in one statement, from the rows it inserted): the rebuild gives, per region, what the
-- projection would have written, and what `crosslogic projections rebuild usage_records`
-- gives from the log. Per tenant and hour the totals stay as they were, so the Stripe pusher
-- (which adds up a tenant's hour over its rows) finds nothing new to send.
-- - updated_at: the row's latest usage, as the projection keeps it (rows from before 0014 had
--   the time 0008 ran instead).
-- - last_position: the highest log position of the row's usage events (the event id is the
--   identity of a request's usage in both tables), exact even for rows that 0014 left at 0.
--   A record without its event (none should exist) reads 0, like those rows did: the pusher's
--   first pass as leader looks at every hour anyway.
-- The indexes on hour and last_position stay as they are: TRUNCATE keeps them, and fills them
-- again with the rows.
TRUNCATE usage_hourly;
INSERT INTO usage_hourly (tenant_id, environment_id, model, region, hour, requests,
                          prompt_tokens, completion_tokens, cost, updated_at, last_position)
SELECT r.tenant_id, r.environment_id, r.model, r.region,
       date_trunc('hour', r.occurred_at, 'UTC'), count(*), sum(r.prompt_tokens),
       sum(r.completion_tokens), sum(r.cost), max(r.occurred_at), coalesce(max(e.position), 0)
FROM usage_records r LEFT JOIN events e USING (event_id)
GROUP BY 1, 2, 3, 4, 5;

-- A billing process still running the previous projection (no region, the old conflict
-- target) now fails its batches and retries them until it is replaced: nothing is lost, its
-- checkpoint does not move past them.
ALTER TABLE usage_hourly ALTER COLUMN region SET NOT NULL;
ALTER TABLE usage_hourly ADD PRIMARY KEY (tenant_id, hour, environment_id, model, region);
