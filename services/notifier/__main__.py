"""`python -m services.notifier` (or `crosslogic serve notifier`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.settings import SettingsError, load_settings
from services.notifier.app import create_notifier_app
from services.notifier.settings import NotifierSettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notifier", description=__doc__)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(NotifierSettings, http_port=args.port)
        app = create_notifier_app(settings)
    except (SettingsError, ValueError) as exc:
        print(f"notifier: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=settings.log_json, service="notifier")
    serve(app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
