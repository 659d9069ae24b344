"""`crosslogic nats …`: the platform's NATS identities (docs/security.md).

- `init DIR`: a new authority (operator, accounts, keys), the server's configuration and one
  credential per identity; keep DIR offline, hand each credential to its service.
- `setup`: create or update the JetStream streams (as the provisioner identity).
- `creds ROLE`: a fresh credential for a service or tool (rotation: issue, deploy, revoke).
- `key FILE`: the public key of a credential (what `revoke` takes).
- `revoke KEY`: close and refuse a user key now (a leaked credential).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from services.infra.natsauth.authority import Authority
from services.infra.natsauth.identities import Role

if TYPE_CHECKING:
    from services.infra.natsauth.revocations import AccountResolver

__all__ = ["RevokeRaced", "register_nats_commands", "revoke_keys"]

def _auth_dir(args: argparse.Namespace) -> Path:
    dev = Path(os.environ.get("CROSSLOGIC_STATE_DIR", ".state/dev")) / "nats" / "auth"
    folder = Path(args.auth_dir or os.environ.get("NATS_AUTH_DIR") or dev)
    if not (folder / "authority.json").exists():
        raise SystemExit(f"crosslogic: no NATS authority in {folder} (`crosslogic nats init "
                         "DIR`, or pass --auth-dir)")
    return folder


def _nats_url(args: argparse.Namespace) -> str:
    if args.nats_url:
        return str(args.nats_url)
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    from services.cli.dev_urls import read_dev_urls

    urls = read_dev_urls(Path(os.environ.get("CROSSLOGIC_STATE_DIR", ".state/dev")))
    if urls is not None and urls.nats_url:
        return urls.nats_url
    raise SystemExit("crosslogic: set NATS_URL (or pass --nats-url)")


def _cmd_init(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if (folder / "authority.json").exists():
        raise SystemExit(f"crosslogic: {folder} already holds an authority; a second would "
                         "lock every credential out")
    authority = Authority.create()
    authority.save(folder)
    (folder / "server.conf").write_text(authority.server_config(Path(args.resolver_dir)))
    print(f"NATS authority in {folder} (keep it offline: it can issue any identity)\n"
          f"  server.conf      include it in nats-server's configuration\n"
          f"  creds/ROLE.creds NATS_CREDS of each service; admin is break-glass only\n"
          f"  issuer.json      NATS_NODE_ISSUER of the orchestrator (node credentials)")
    return 0


def _cmd_setup(args: argparse.Namespace) -> int:
    from services.infra.bus import Bus

    creds = os.environ.get("NATS_CREDS", "")
    if args.creds_file:
        creds = Path(args.creds_file).read_text()

    async def run() -> None:
        bus = await Bus.connect(_nats_url(args), name="crosslogic-nats-setup", creds=creds)
        try:
            await bus.ensure_streams(replicas=args.replicas)
        finally:
            await bus.close()

    asyncio.run(run())
    print("JetStream streams are up to date")
    return 0


def _cmd_creds(args: argparse.Namespace) -> int:
    authority = Authority.load(_auth_dir(args))
    expires = int(time.time() + args.expires_days * 86400) if args.expires_days else 0
    sys.stdout.write(authority.user(Role(args.role), expires_at=expires).text())
    return 0


def _cmd_key(args: argparse.Namespace) -> int:
    """Whose a credential is: what `revoke` takes, to retire it after a rotation."""
    from datetime import UTC, datetime

    from services.infra.natsauth.creds import Credentials

    creds = Credentials.parse(Path(args.file).read_text())
    expires = (datetime.fromtimestamp(creds.expires_at, UTC).isoformat()
               if creds.expires_at else "never")
    role = creds.role.value if creds.role else "?"
    print(f"{creds.public_key}  role={role} name={creds.name} expires={expires}")
    return 0


class RevokeRaced(RuntimeError):
    """The account JWT kept changing under us: the revocation may not have stuck."""


async def revoke_keys(resolver: AccountResolver, keys: Iterable[str], *, signing_seed: str,
                      now: int, attempts: int = 5, settle: float = 5.0) -> int:
    """Revoke `keys` (as of `now`) in the account and see that the servers keep them; the
    number of pushes it took (0: all were revoked already).

    The orchestrator's leader looks up, changes and pushes the same account JWT (revoking
    nodes that ended), and the last push wins: one of its pushes made from a lookup older
    than ours would drop our revocation. So after pushing, look again: at once, and once
    more `settle` seconds later (the leader bounds each of its exchanges with NATS at 5 s,
    so a push of its in flight has landed by then); merge what is missing and push again,
    at most `attempts` times in all. The revocation holds from the first push on: the wait
    only checks that it stays."""
    from services.infra.natsauth.revocations import resign, revised, revocations_of

    wanted = dict.fromkeys(keys, now)
    pushes = 0
    settled = False
    while True:
        current = await resolver.lookup()
        held = revocations_of(current)
        missing = {k: at for k, at in wanted.items() if k not in held}
        if not missing:
            if pushes == 0 or settled:
                return pushes
            settled = True
            await asyncio.sleep(settle)
            continue
        if pushes >= attempts:
            raise RevokeRaced(f"the account changed under {pushes} pushes; run revoke again")
        # An existing revocation is kept as it is: another is the keeper's (at its
        # credential's expiry) or an earlier one of ours.
        merged = revised(held, missing, ())
        assert merged is not None  # something is missing, so something changes
        await resolver.push(resign(current, merged, signing_seed=signing_seed, now=now))
        pushes += 1
        settled = False


def _cmd_revoke(args: argparse.Namespace) -> int:
    import nats
    from nats.aio.client import RawCredentials

    from services.infra.natsauth.revocations import AccountResolver

    issuer = Authority.load(_auth_dir(args)).node_issuer()

    async def run() -> int:
        nc = await nats.connect(_nats_url(args),
                                user_credentials=RawCredentials(issuer.system_creds.text()))
        try:
            return await revoke_keys(AccountResolver(nc, issuer.account), args.key,
                                     signing_seed=issuer.operator_signing_seed,
                                     now=int(time.time()))
        finally:
            await nc.close()

    try:
        pushes = asyncio.run(run())
    except RevokeRaced as exc:
        raise SystemExit(f"crosslogic: {exc}") from None
    if pushes == 0:
        print("already revoked")
    else:
        print(f"revoked {len(args.key)} key(s): their connections are closed")
    return 0


def register_nats_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nats_p = sub.add_parser("nats", help="NATS identities and streams (docs/security.md)")
    nats_p.add_argument("--auth-dir", help="the authority's folder (default: $NATS_AUTH_DIR, "
                        "or the running `crosslogic dev`'s)")
    nats_p.add_argument("--nats-url", help="default: $NATS_URL, or the running `crosslogic dev`")
    ns = nats_p.add_subparsers(dest="nats_command", required=True)
    p = ns.add_parser("init", help="a new authority: keys, server.conf, a credential per identity")
    p.add_argument("dir")
    p.add_argument("--resolver-dir", default="/data/accounts",
                   help="where nats-server keeps account JWTs (default: /data/accounts)")
    p.set_defaults(func=_cmd_init)
    p = ns.add_parser("setup", help="create or update the JetStream streams (provisioner "
                      "identity: $NATS_CREDS or --creds-file)")
    p.add_argument("--creds-file")
    p.add_argument("--replicas", type=int,
                   default=int(os.environ.get("NATS_STREAM_REPLICAS", "1")))
    p.set_defaults(func=_cmd_setup)
    p = ns.add_parser("creds", help="print a new credential for a service or tool identity")
    p.add_argument("role", choices=[r.value for r in Role if r is not Role.NODE])
    p.add_argument("--expires-days", type=float, default=0.0)
    p.set_defaults(func=_cmd_creds)
    p = ns.add_parser("key", help="the public key (U…), role and expiry of a .creds file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_key)
    p = ns.add_parser("revoke", help="revoke user keys (U…): connections closed, JWTs refused")
    p.add_argument("key", nargs="+")
    p.set_defaults(func=_cmd_revoke)
