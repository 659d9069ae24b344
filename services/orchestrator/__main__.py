"""`python -m services.orchestrator` (or `crosslogic serve orchestrator`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.infra.entry import service_main
from services.orchestrator.app import LauncherError, create_orchestrator_app
from services.orchestrator.settings import OrchestratorSettings


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("orchestrator", __doc__, OrchestratorSettings,
                        create_orchestrator_app, argv,
                        refused=(LauncherError,))


if __name__ == "__main__":
    sys.exit(main())
