"""`python -m services.monitor` (or `crosslogic serve monitor`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.settings import SettingsError, load_settings
from services.monitor.app import create_monitor_app
from services.monitor.settings import MonitorSettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monitor", description=__doc__)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(MonitorSettings, http_port=args.port)
    except SettingsError as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=settings.log_json, service="monitor")
    serve(create_monitor_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
