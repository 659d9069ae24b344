-- The reference's columns: `tenants.stripe_customer_id` (the tenants projection now takes
-- billing.customer_linked) and `billing_events.stripe_id` (what Stripe knows the event by: the
-- webhook's event id, the customer, or a meter event's identifier). Both projections are
-- rebuilt from the log like the rest; rows from before this migration are filled here, from
-- what the billing projection already holds.
ALTER TABLE billing_events ADD COLUMN stripe_id text;
UPDATE billing_events
   SET stripe_id = coalesce(data->>'stripe_event_id', data->>'identifier',
                            data->>'customer_id');
CREATE INDEX billing_events_stripe_id ON billing_events (stripe_id) WHERE stripe_id IS NOT NULL;

UPDATE tenants t SET stripe_customer_id = a.customer_id
  FROM billing_accounts a
 WHERE a.tenant_id = t.id AND a.customer_id IS NOT NULL;
