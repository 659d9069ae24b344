"""`python -m services.billing` (or `crosslogic serve billing`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.infra.http import serve
from services.infra.logging import configure_logging
from services.infra.settings import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="billing", description=__doc__)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(BillingSettings, http_port=args.port)
        app = create_billing_app(settings)
    except (SettingsError, ValueError) as exc:
        print(f"billing: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=settings.log_json, service="billing")
    serve(app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
