"""Billing: usage records priced from the catalog, hourly aggregates, Stripe Meter Events
(exactly once) and Stripe webhooks. See docs/billing.md."""
