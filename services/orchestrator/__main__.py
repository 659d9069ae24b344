"""`python -m services.orchestrator` (or `crosslogic serve orchestrator`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.settings import SettingsError, load_settings
from services.orchestrator.app import LauncherError, create_orchestrator_app
from services.orchestrator.settings import OrchestratorSettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(OrchestratorSettings, http_port=args.port)
        app = create_orchestrator_app(settings)
    except (SettingsError, LauncherError) as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=settings.log_json, service="orchestrator")
    serve(app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
