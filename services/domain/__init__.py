"""The domain several services share, on top of services/infra/: the catalog (tenants,
environments, keys, models, deployments), the fleet's node states, notifications, the billing
ledger and Stripe, prices, budgets and usage queries. No service imports another; what two of
them need of the domain lives here."""
