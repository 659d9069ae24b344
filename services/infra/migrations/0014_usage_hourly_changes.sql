-- The Stripe pusher looks, on most passes, only at the tenant hours whose usage changed since
-- its previous pass, instead of adding up 45 days of usage_hourly every 30 seconds.
-- last_position: the highest log position of the usage events in the row (the projection
-- keeps the greatest, so it is the same after a rebuild, however the events were batched).
-- Rows from before this column read 0: the pusher's first pass as leader looks at every hour.
ALTER TABLE usage_hourly ADD COLUMN last_position bigint NOT NULL DEFAULT 0;
CREATE INDEX usage_hourly_last_position ON usage_hourly (last_position);
-- Hours skipped for a tenant without a Stripe customer, looked at again once it is linked.
CREATE INDEX meter_exports_skipped ON meter_exports (tenant_id, hour) WHERE status = 'skipped';
