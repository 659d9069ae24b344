"""`python -m services.billing` (or `crosslogic serve billing`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.infra.entry import service_main


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("billing", __doc__, BillingSettings, create_billing_app, argv,
                        refused=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
