-- A request id is the caller's X-Request-ID when it sent a sane one: neither unique, nor a
-- tenant's alone. Keyed on it, a client reusing an id (or two tenants choosing the same one)
-- was billed once for many requests. The event id is what identifies one request's usage:
-- the gateway mints it once and keeps it through retries and spool replays.
ALTER TABLE usage_records DROP CONSTRAINT usage_records_pkey;
ALTER TABLE usage_records ADD PRIMARY KEY (event_id);
CREATE INDEX usage_records_request ON usage_records (request_id);
