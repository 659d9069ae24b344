"""The orchestrator: launches and terminates GPU nodes (SkyPilot, or local processes),
reconciles deployments between their min and max, autoscales on load, replaces lost nodes."""
