"""Billing: usage records priced from the catalog (and, later, hourly aggregates pushed to
Stripe as meter events)."""
