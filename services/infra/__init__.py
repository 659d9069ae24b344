"""Infrastructure every service (and the node agent) runs on: the event log and its
projections, the NATS bus and its identities, the outbox relay and recorder, the HTTP service
shell, PostgreSQL and Redis access, settings, logging, leadership, migrations and the embedded
dev servers. It knows nothing of tenants, models or bills (services/domain/ does), and never
imports them (tests/unit/test_architecture.py)."""
