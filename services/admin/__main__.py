"""`python -m services.admin [--port P]` (also `crosslogic serve admin`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.admin.app import create_admin_app
from services.admin.settings import AdminSettings
from services.infra.entry import service_main


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("admin", "CrossLogic admin API", AdminSettings, create_admin_app, argv)


if __name__ == "__main__":
    sys.exit(main())
