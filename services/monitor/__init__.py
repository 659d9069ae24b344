"""The monitor: records node lifecycle events, acknowledges registrations, keeps the latest
heartbeat of every node in Redis and the `nodes` projection current."""
