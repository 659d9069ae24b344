"""`python -m services.admin [--port P]` (also `crosslogic serve admin`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.admin.app import create_admin_app
from services.admin.settings import AdminSettings, check_settings
from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.settings import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admin", description="CrossLogic admin API")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8081)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(AdminSettings, http_port=args.port)
        check_settings(settings)
    except SettingsError as exc:
        print(f"admin: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=settings.log_json, service="admin")
    serve(create_admin_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
