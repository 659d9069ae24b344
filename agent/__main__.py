"""`python -m agent`: the node agent, configured from the environment (docs/agent.md)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from agent.node_agent import NodeAgent
from agent.settings import AgentSettings
from services.infra.logging import configure_logging
from services.infra.settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings(AgentSettings)
    except SettingsError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=settings.log_json, service="agent")
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(NodeAgent(settings).run())
    return asyncio.run(NodeAgent(settings).run())


if __name__ == "__main__":
    sys.exit(main())
