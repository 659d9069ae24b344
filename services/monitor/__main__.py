"""`python -m services.monitor` (or `crosslogic serve monitor`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.infra.entry import service_main
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("monitor", __doc__, MonitorSettings, create_monitor_app, argv)


if __name__ == "__main__":
    sys.exit(main())
