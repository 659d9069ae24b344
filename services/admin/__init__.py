"""The control-plane admin API: tenants, environments, API keys, models, deployments and the
event log, over HTTP under ``/admin/v1/`` (docs/admin-api.md). Every write is a `Catalog`
command; `python -m services.admin` (or `crosslogic serve admin`) runs it."""
