-- Billing by cost (issue 22): from which hour a tenant is billed on the cost meter (its
-- subscription has the cost price) rather than the input- and output-token meters. NULL: the
-- token prices (tenants linked before the cost price existed, until they are switched).
-- Set by billing.customer_linked (a link to the cost price) and billing.pricing_switched.
ALTER TABLE billing_accounts ADD COLUMN cost_from timestamptz;
