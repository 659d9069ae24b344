"""The `crosslogic` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from services.cli.admin_commands import register_admin_commands
from services.cli.nats_commands import register_nats_commands
from services.infra.log_records import EventFilter


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    from services.cli.dev_urls import read_dev_urls

    urls = read_dev_urls(Path(os.environ.get("CROSSLOGIC_STATE_DIR", ".state/dev")))
    if urls is not None and urls.database_url:
        return urls.database_url
    raise SystemExit("crosslogic: set DATABASE_URL (or pass --database-url), "
                     "or run `crosslogic dev` in this folder")


def _cmd_migrate(args: argparse.Namespace) -> int:
    from services.infra.migrate import migrate

    applied = asyncio.run(migrate(_database_url(args)))
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    if not applied:
        print("nothing to apply: the database is up to date")
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from services.cli.tail import parse_since, tail

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise SystemExit(f"crosslogic: {exc}") from None
    flt = EventFilter(types=tuple(args.type or ()), stream=args.stream,
                      min_position=args.from_position, since=since)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a live tail ends
        asyncio.run(tail(_database_url(args), flt, follow=not args.no_follow,
                         as_json=args.json))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    async def run() -> None:
        from services.infra.db import create_pool
        from services.infra.event_stats import EventTypeStats
        from services.infra.eventlog import EventLog
        from services.infra.projections import ProjectionRunner

        pool = await create_pool(_database_url(args), min_size=1, max_size=2)
        try:
            # Bring the projection up to the end of the log first: the figures are current.
            await ProjectionRunner(EventLog(pool), EventTypeStats()).catch_up()
            rows = await pool.fetch(
                "SELECT type, events, last_position, last_recorded_at FROM event_type_stats "
                "ORDER BY type")
        finally:
            await pool.close()
        print(f"{'TYPE':<36} {'EVENTS':>10} {'LAST POSITION':>14}  LAST RECORDED")
        for r in rows:
            print(f"{r['type']:<36} {r['events']:>10} {r['last_position']:>14}  "
                  f"{r['last_recorded_at']:%Y-%m-%d %H:%M:%S}")

    asyncio.run(run())
    return 0


def _cmd_projections(args: argparse.Namespace) -> int:
    from services.cli.registry import all_projections
    from services.infra.projections import UnknownProjection

    registry = all_projections()
    if args.action == "list":
        for name in registry.names():
            print(name)
        return 0
    if args.all == bool(args.name):
        raise SystemExit("crosslogic: name one projection, or --all")
    try:
        names = registry.names() if args.all else [registry.get(args.name).name]
    except UnknownProjection as exc:
        raise SystemExit(f"crosslogic: {exc.args[0]}") from None
    asyncio.run(_run_projections(_database_url(args), names, rebuild=args.action == "rebuild"))
    return 0


async def _run_projections(database_url: str, names: Sequence[str], *, rebuild: bool) -> None:
    from services.cli.registry import all_projections
    from services.infra.db import create_pool
    from services.infra.eventlog import EventLog
    from services.infra.projections import ProjectionRunner

    registry = all_projections()
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        for name in names:
            runner = ProjectionRunner(EventLog(pool), registry.get(name))
            if rebuild:
                applied = await runner.rebuild()
                print(f"rebuilt {name}: {applied} events applied, "
                      f"checkpoint {await runner.checkpoint()}")
            else:
                applied = await runner.catch_up()
                print(f"{name}: caught up ({applied} events applied), "
                      f"checkpoint {await runner.checkpoint()}")
    finally:
        await pool.close()


def _cmd_backup(args: argparse.Namespace) -> int:
    from datetime import UTC

    from services.cli.backup import BackupError, backup
    from services.cli.offsite import backup_name

    now = datetime.now(UTC)
    try:
        if args.to is not None:
            return _backup_offsite(args, now)
        out = Path(args.out or backup_name(now))
        size = backup(_database_url(args), out)
    except BackupError as exc:
        raise SystemExit(f"crosslogic backup: {exc}") from None
    print(f"wrote {out} ({size:,} bytes)")
    return 0


def _backup_offsite(args: argparse.Namespace, now: datetime) -> int:
    """Dump to a temporary file, upload it under the prefix, then prune what has expired:
    only after the new one is safely there."""
    import tempfile

    from services.cli.backup import BackupError, backup
    from services.cli.offsite import OffsiteStore, backup_name, expired, parse_s3_url

    if not args.to.strip():
        raise BackupError("--to is empty: set BACKUP_S3_URL (s3://bucket/prefix/) in the "
                          "backup's environment")
    prefix = parse_s3_url(args.to)
    if not prefix.is_prefix:
        raise BackupError(f"--to takes a prefix ending in '/': {args.to}")
    if args.out:
        raise BackupError("give --out or --to, not both")
    store = OffsiteStore(os.environ, _endpoint(args))
    where = prefix.child(backup_name(now))
    with tempfile.TemporaryDirectory(prefix="crosslogic-backup-") as tmp:
        dump = Path(tmp) / "backup.dump"
        backup(_database_url(args), dump)
        size = store.upload(dump, where)
    print(f"wrote {where.url} ({size:,} bytes)")
    old = expired(store.keys(prefix), now, args.keep_days)
    if old:
        store.delete(prefix.bucket, old)
    print(f"pruned {len(old)} backup(s) older than {args.keep_days:g} days")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from services.cli.backup import BackupError
    from services.cli.registry import all_projections

    if not args.yes:
        raise SystemExit("crosslogic restore replaces everything the database holds: stop the "
                         "services, then run it again with --yes")
    database_url = _database_url(args)
    try:
        restored = _restore_from(args, database_url)
    except BackupError as exc:
        raise SystemExit(f"crosslogic restore: {exc}") from None
    print(f"restored {restored}")
    if not args.no_rebuild:
        # The log is the truth: every read model is rebuilt from it, whatever the dump held.
        asyncio.run(_run_projections(database_url, all_projections().names(), rebuild=True))
    return 0


def _endpoint(args: argparse.Namespace) -> str | None:
    """--endpoint-url, else BACKUP_S3_ENDPOINT_URL (empty: none, boto3's own then)."""
    return args.endpoint_url or os.environ.get("BACKUP_S3_ENDPOINT_URL") or None


def _restore_from(args: argparse.Namespace, database_url: str) -> str:
    """Restore a local file, or an s3:// dump (or the newest under an s3:// prefix with
    --latest) downloaded first; what was restored."""
    import tempfile

    from services.cli.backup import BackupError, restore
    from services.cli.offsite import OffsiteStore, is_s3_url, latest, parse_s3_url

    if not is_s3_url(args.file):
        if args.latest:
            raise BackupError("--latest takes an s3:// prefix")
        restore(database_url, Path(args.file))
        return str(args.file)
    where = parse_s3_url(args.file)
    store = OffsiteStore(os.environ, _endpoint(args))
    if where.is_prefix:
        if not args.latest:
            raise BackupError(f"{args.file} is a prefix: name a dump, or add --latest")
        newest = latest(store.keys(where))
        if newest is None:
            raise BackupError(f"no crosslogic-*.dump under {where.url}")
        where = type(where)(where.bucket, newest)
    elif args.latest:
        raise BackupError("--latest takes a prefix ending in '/'")
    with tempfile.TemporaryDirectory(prefix="crosslogic-restore-") as tmp:
        dump = Path(tmp) / "restore.dump"
        store.download(where, dump)
        restore(database_url, dump)
    return where.url


def _cmd_dev(args: argparse.Namespace) -> int:
    from services.cli.dev import run_dev

    return run_dev(Path(args.state_dir), fresh=args.fresh)


def _cmd_relay(args: argparse.Namespace) -> int:
    from services.infra.http import serve
    from services.infra.logging import configure_logging
    from services.infra.relay import RelaySettings, relay_app
    from services.infra.settings import SettingsError, load_settings

    try:
        settings = load_settings(RelaySettings, http_port=args.port)
    except SettingsError as exc:
        raise SystemExit(f"crosslogic relay: {exc}") from None
    configure_logging(settings.log_level, json=settings.log_json, service="relay")
    serve(relay_app(settings), settings)
    return 0


SERVICES = {"gateway": "services.gateway.__main__", "admin": "services.admin.__main__",
            "monitor": "services.monitor.__main__", "billing": "services.billing.__main__",
            "notifier": "services.notifier.__main__",
            "orchestrator": "services.orchestrator.__main__"}


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(SERVICES[args.service])
    code: int = module.main(args.service_args)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosslogic",
                                     description="CrossLogic inference platform: operator CLI")
    parser.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL, "
                        "or the running `crosslogic dev`)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the SQL migrations that are missing")
    p.set_defaults(func=_cmd_migrate)

    events = sub.add_parser("events", help="the event log")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    p = events_sub.add_parser("tail", help="print events from the log, then follow live")
    p.add_argument("--type", action="append", metavar="GLOB",
                   help="event type glob, e.g. 'node.*' (repeatable)")
    p.add_argument("--stream", metavar="S", help="stream name or glob, e.g. 'node:*'")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--since", metavar="WHEN", help="10m, 2h, 7d or an ISO time")
    start.add_argument("--from", dest="from_position", type=int, metavar="N",
                       help="from log position N")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-follow", action="store_true", help="print history and exit")
    p.set_defaults(func=_cmd_tail)
    p = events_sub.add_parser("stats", help="events per type (projection event_type_stats)")
    p.set_defaults(func=_cmd_stats)

    proj = sub.add_parser("projections", help="read models built from the log")
    proj_sub = proj.add_subparsers(dest="action", required=True)
    proj_sub.add_parser("list", help="the projections there are").set_defaults(
        func=_cmd_projections)
    for action, text in (("rebuild", "empty a projection and replay the whole log into it"),
                         ("catch-up", "apply what a projection has not seen yet")):
        p = proj_sub.add_parser(action, help=text)
        p.add_argument("name", nargs="?")
        p.add_argument("--all", action="store_true", help="every projection")
        p.set_defaults(func=_cmd_projections)

    p = sub.add_parser("backup", help="the whole database to one file (pg_dump, custom format)")
    p.add_argument("-o", "--out", metavar="FILE",
                   help="default: crosslogic-<UTC time>.dump here")
    p.add_argument("--to", metavar="s3://BUCKET/PREFIX/",
                   help="upload it to S3-compatible storage instead (AWS_* or R2_* "
                   "credentials), then delete dumps there older than --keep-days")
    p.add_argument("--keep-days", type=float, default=30.0,
                   help="with --to: days of dumps kept (default 30; 0 keeps all)")
    p.add_argument("--endpoint-url", help="the storage's S3 endpoint (default: "
                   "BACKUP_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, R2's from R2_ACCOUNT_ID, "
                   "or AWS)")
    p.set_defaults(func=_cmd_backup)
    p = sub.add_parser("restore", help="replace the database with a backup, then rebuild "
                       "every projection from the restored log")
    p.add_argument("file", help="a dump file, or s3://BUCKET/KEY.dump, or s3://BUCKET/PREFIX/ "
                   "with --latest")
    p.add_argument("--latest", action="store_true",
                   help="restore the newest crosslogic-*.dump under the s3:// prefix")
    p.add_argument("--endpoint-url", help="the storage's S3 endpoint, as for backup")
    p.add_argument("--yes", action="store_true", help="yes, replace what the database holds")
    p.add_argument("--no-rebuild", action="store_true", help="keep the projections as dumped")
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("dev", help="run the platform locally on embedded servers")
    p.add_argument("--state-dir", default=os.environ.get("CROSSLOGIC_STATE_DIR", ".state/dev"))
    p.add_argument("--fresh", action="store_true", help="delete the state folder first")
    p.set_defaults(func=_cmd_dev)

    p = sub.add_parser("serve", help="run one service of the platform (settings from the "
                       "environment)")
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument("service_args", nargs=argparse.REMAINDER,
                   help="the service's own options, e.g. --workers 4 --port 8080")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("relay", help="run the outbox relay (log → NATS) as a service")
    p.add_argument("--port", type=int, default=None, help="HTTP port for /health, /metrics")
    p.set_defaults(func=_cmd_relay)

    register_nats_commands(sub)
    register_admin_commands(sub)  # tenants, environments, keys, models, deployments
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
