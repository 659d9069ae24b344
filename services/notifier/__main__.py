"""`python -m services.notifier` (or `crosslogic serve notifier`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.infra.entry import service_main
from services.notifier.app import create_notifier_app
from services.notifier.settings import NotifierSettings


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("notifier", __doc__, NotifierSettings, create_notifier_app, argv,
                        refused=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
