"""`crosslogic tenants|environments|keys|models|deployments …`: the admin API from a terminal.

Each command is one or a few requests through `AdminClient`; what comes back is printed as a
table (lists), ``field: value`` lines (one object) or, with ``--json``, as JSON. An error
answer prints the API's own message and exits 1; a missing token or URL exits 2.

The families live in their own modules (admin_tenancy, admin_fleet, admin_billing,
admin_subscriptions), how a command runs in admin_runner; this one puts them on `crosslogic`.
"""

from __future__ import annotations

from typing import Any

from services.cli.admin_billing import register_billing_commands
from services.cli.admin_fleet import register_fleet_commands
from services.cli.admin_runner import AdminParsers
from services.cli.admin_subscriptions import register_subscription_commands
from services.cli.admin_tenancy import register_tenancy_commands


def register_admin_commands(sub: Any) -> None:
    """Add the admin groups to `crosslogic`'s subparsers (`sub`: argparse's
    `_SubParsersAction`, which has no public type)."""
    parsers = AdminParsers(sub)
    # In this order: `crosslogic --help` lists the groups as they are added.
    register_tenancy_commands(parsers)
    register_fleet_commands(parsers)
    register_billing_commands(parsers)
    register_subscription_commands(parsers)
