"""How an admin command runs and is declared: the client (flags, environment or a running
`crosslogic dev`), the answer printed as a table, object or JSON with the exit code, the flags
every admin command shares, and the request-body helpers the command families use."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.cli.admin_client import (
    AdminApiError,
    AdminClient,
    AdminConfigError,
    AdminUnreachable,
    resolve_target,
)
from services.cli.admin_format import (
    Column,
    format_json,
    format_object,
    format_table,
    new_key_message,
)

Command = Callable[[AdminClient, argparse.Namespace], Any]
"""Does the requests; returns what to print: an object, a list (with `columns`), or None."""


def _client(args: argparse.Namespace) -> AdminClient:
    state_dir = Path(os.environ.get("CROSSLOGIC_STATE_DIR", ".state/dev"))
    return AdminClient(resolve_target(args.admin_url, args.admin_token, os.environ, state_dir))


def run_command(command: Command, columns: Sequence[Column] = ()) -> Callable[
        [argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            result = command(_client(args), args)
        except AdminConfigError as exc:
            print(f"crosslogic: {exc}", file=sys.stderr)
            return 2
        except (AdminApiError, AdminUnreachable, ValueError) as exc:
            print(f"crosslogic: {exc}", file=sys.stderr)
            return 1
        if args.json:
            if result is not None:
                print(format_json(result))
        elif isinstance(result, list):
            print(format_table(result, columns) if result else "(none)")
        elif isinstance(result, dict) and "key" in result and "last_four" in result:
            print(new_key_message(result))
        elif isinstance(result, dict):
            print(format_object(result))
        return 0

    return run


def limit_fields(args: argparse.Namespace, *, concurrency: bool) -> dict[str, int]:
    """The limit flags given, as the API's field names (flags not given are left out)."""
    names = [("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute"),
             ("tpd", "tokens_per_day")] + ([("concurrency", "concurrency")] if concurrency
                                           else [])
    return {field: getattr(args, flag) for flag, field in names
            if getattr(args, flag, None) is not None}


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def pages(c: AdminClient, path: str, filters: dict[str, str | int],
          most: int | None = None) -> list[Any]:
    """Rows of a paged list with filters, following `next_cursor` (up to `most`)."""
    rows: list[Any] = []
    query: dict[str, str | int] = {**filters, "limit": min(most or 200, 200)}
    while True:
        page = c.get(path, query)
        rows.extend(page["data"])
        if not page.get("next_cursor") or (most is not None and len(rows) >= most):
            return rows[:most] if most is not None else rows
        query["cursor"] = page["next_cursor"]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-url", metavar="URL",
                        help="admin API (default: $CROSSLOGIC_ADMIN_URL, the running "
                             "`crosslogic dev`, or http://127.0.0.1:8081)")
    common.add_argument("--admin-token", metavar="TOKEN",
                        help="admin token (prefer $CROSSLOGIC_ADMIN_TOKEN: arguments show "
                             "in `ps`)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    return common


def limit_flags(p: argparse.ArgumentParser, *, concurrency: bool) -> None:
    p.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    p.add_argument("--tpm", type=int, metavar="N", help="tokens per minute")
    p.add_argument("--tpd", type=int, metavar="N", help="tokens per day")
    if concurrency:
        p.add_argument("--concurrency", type=int, metavar="N", help="requests in flight")


class AdminParsers:
    """Adds admin groups and their commands to `crosslogic`'s subparsers (`sub`: argparse's
    `_SubParsersAction`, which has no public type), every command with the common flags."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self._common = _common()

    def group(self, name: str, help_: str) -> Any:
        return self._sub.add_parser(name, help=help_).add_subparsers(dest=f"{name}_command",
                                                                      required=True)

    def leaf(self, group: Any, name: str, help_: str, command: Command,
             columns: Sequence[Column] = ()) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, parents=[self._common])
        p.set_defaults(func=run_command(command, columns))
        return p
