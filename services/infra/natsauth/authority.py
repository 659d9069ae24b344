"""The keys of the platform's NATS, and everything made from them.

`Authority` holds every seed: the operator (the root of trust), its signing key, the system
account, the CROSSLOGIC account and its scoped node signing key. From them it writes the
server's configuration, each service's credential, and the `NodeIssuer` the orchestrator
gets: the least needed to issue node credentials at launch and revoke them when nodes end.

`crosslogic nats init DIR` and `crosslogic dev` keep an authority in a folder
(`authority.json`, mode 0600): operators keep that folder offline, like a CA's root key.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.infra.natsauth.creds import ROLE_TAG, Credentials
from services.infra.natsauth.identities import NODE_SCOPE, SERVICES, Role, permissions
from services.infra.natsauth.jwt import (
    Permissions,
    ScopedKey,
    account_claims,
    encode,
    operator_claims,
    user_claims,
)
from services.infra.natsauth.keys import KeyKind, new_seed, public_key

__all__ = ["ACCOUNT_NAME", "Authority", "NodeIssuer", "pusher_permissions"]

OPERATOR_NAME = "crosslogic"
ACCOUNT_NAME = "CROSSLOGIC"
SYSTEM_ACCOUNT_NAME = "SYS"

AUTH_ERROR_ADVISORIES = "$SYS.SERVER.*.CLIENT.AUTH.ERR"
"""Where the servers announce a connection they refused (no, a forged or an expired
credential)."""


def disconnect_advisories(account: str) -> str:
    """Where the servers announce a closed connection of `account` (with the reason:
    "Credentials Revoked" when a revocation closed it)."""
    return f"$SYS.ACCOUNT.{account}.DISCONNECT"


def pusher_permissions(account: str) -> Permissions:
    """The system-account user that looks up and pushes the CROSSLOGIC account's JWT (to
    revoke node credentials) and hears the servers refuse and close its connections: nothing
    else of the servers' own subjects, nothing of another account."""
    return Permissions(
        pub_allow=(f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.UPDATE",
                   f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP"),
        sub_allow=("_INBOX.>", AUTH_ERROR_ADVISORIES, disconnect_advisories(account)))


def node_scope(key: str) -> ScopedKey:
    return ScopedKey(key=key, role="node", template=NODE_SCOPE,
                     description="GPU nodes: each speaks only of itself")


@dataclass(frozen=True)
class NodeIssuer:
    """What the orchestrator holds: it mints a credential for each node it launches and
    revokes it when the node ends. It cannot mint a service's credential: the node key is
    scoped, so whatever it signs gets the node template's permissions."""

    account: str
    node_signing_seed: str = field(repr=False)
    operator_signing_seed: str = field(repr=False)
    system_creds: Credentials = field(repr=False)

    def node_credentials(self, node_id: uuid.UUID, *, ttl_seconds: float,
                         now: float | None = None) -> Credentials:
        issued = int(time.time() if now is None else now)
        seed = new_seed(KeyKind.USER)
        claims = user_claims(name=str(node_id), user=public_key(seed),
                             issuer_account=self.account, issued_at=issued,
                             expires_at=issued + max(1, int(ttl_seconds)),
                             tags=(f"{ROLE_TAG}{Role.NODE.value}",))
        return Credentials(encode(claims, self.node_signing_seed), seed)

    def to_json(self) -> str:
        return json.dumps({"account": self.account,
                           "node_signing_seed": self.node_signing_seed,
                           "operator_signing_seed": self.operator_signing_seed,
                           "system_creds": self.system_creds.text()})

    @classmethod
    def from_json(cls, text: str) -> NodeIssuer:
        try:
            data = json.loads(text)
            return cls(account=data["account"], node_signing_seed=data["node_signing_seed"],
                       operator_signing_seed=data["operator_signing_seed"],
                       system_creds=Credentials.parse(data["system_creds"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a node issuer (NATS_NODE_ISSUER): "
                             f"{type(exc).__name__}") from None


@dataclass(frozen=True)
class _Seeds:
    operator: str = field(repr=False)
    operator_signing: str = field(repr=False)
    system_account: str = field(repr=False)
    account: str = field(repr=False)
    node_signing: str = field(repr=False)
    issued_at: int = 0


class Authority:
    def __init__(self, seeds: _Seeds) -> None:
        self._seeds = seeds

    def __repr__(self) -> str:
        return f"Authority(account={self.account!r})"

    @classmethod
    def create(cls) -> Authority:
        return cls(_Seeds(operator=new_seed(KeyKind.OPERATOR),
                          operator_signing=new_seed(KeyKind.OPERATOR),
                          system_account=new_seed(KeyKind.ACCOUNT),
                          account=new_seed(KeyKind.ACCOUNT),
                          node_signing=new_seed(KeyKind.ACCOUNT),
                          issued_at=int(time.time())))

    @classmethod
    def load(cls, folder: Path) -> Authority:
        data = json.loads((folder / "authority.json").read_text())
        return cls(_Seeds(**data))

    @classmethod
    def load_or_create(cls, folder: Path) -> Authority:
        if (folder / "authority.json").exists():
            return cls.load(folder)
        authority = cls.create()
        authority.save(folder)
        return authority

    def save(self, folder: Path) -> None:
        """authority.json (every seed), server.conf, one .creds per identity, and
        issuer.json for the orchestrator; each readable by its owner only."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        _write_secret(folder / "authority.json", json.dumps(asdict(self._seeds), indent=2))
        _write_secret(folder / "issuer.json", self.node_issuer().to_json())
        creds = folder / "creds"
        creds.mkdir(exist_ok=True)
        creds.chmod(0o700)
        for role in (*SERVICES, Role.PROVISIONER, Role.OBSERVER, Role.ADMIN):
            _write_secret(creds / f"{role.value}.creds", self.user(role).text())

    # ------------------------------------------------------------------ public keys

    @property
    def operator(self) -> str:
        return public_key(self._seeds.operator)

    @property
    def account(self) -> str:
        return public_key(self._seeds.account)

    @property
    def system_account(self) -> str:
        return public_key(self._seeds.system_account)

    # ------------------------------------------------------------------ JWTs

    def operator_jwt(self) -> str:
        return encode(operator_claims(
            name=OPERATOR_NAME, operator=self.operator,
            signing_keys=(public_key(self._seeds.operator_signing),),
            system_account=self.system_account, issued_at=self._seeds.issued_at),
            self._seeds.operator)

    def system_account_jwt(self) -> str:
        return encode(account_claims(name=SYSTEM_ACCOUNT_NAME, account=self.system_account,
                                     issued_at=self._seeds.issued_at),
                      self._seeds.operator_signing)

    def account_jwt(self, *, revocations: dict[str, int] | None = None,
                    issued_at: int | None = None) -> str:
        return encode(account_claims(
            name=ACCOUNT_NAME, account=self.account,
            issued_at=self._seeds.issued_at if issued_at is None else issued_at,
            signing_keys=(node_scope(public_key(self._seeds.node_signing)),),
            jetstream=True, revocations=revocations),
            self._seeds.operator_signing)

    def user(self, role: Role, *, name: str = "", expires_at: int = 0) -> Credentials:
        """A new credential for a service or tool identity (a new key each time: rotate by
        issuing anew, then revoking the old key)."""
        seed = new_seed(KeyKind.USER)
        claims = user_claims(name=name or role.value, user=public_key(seed),
                             issuer_account=self.account, issued_at=int(time.time()),
                             expires_at=expires_at, tags=(f"{ROLE_TAG}{role.value}",),
                             permissions=permissions(role))
        return Credentials(encode(claims, self._seeds.account), seed)

    def system_user(self, name: str = "account-pusher") -> Credentials:
        seed = new_seed(KeyKind.USER)
        claims = user_claims(name=name, user=public_key(seed),
                             issuer_account=self.system_account, issued_at=int(time.time()),
                             permissions=pusher_permissions(self.account))
        return Credentials(encode(claims, self._seeds.system_account), seed)

    def node_issuer(self) -> NodeIssuer:
        return NodeIssuer(account=self.account, node_signing_seed=self._seeds.node_signing,
                          operator_signing_seed=self._seeds.operator_signing,
                          system_creds=self.system_user())

    def node_credentials(self, node_id: uuid.UUID, *, ttl_seconds: float = 86400.0) -> \
            Credentials:
        return self.node_issuer().node_credentials(node_id, ttl_seconds=ttl_seconds)

    # ------------------------------------------------------------------ the server

    def server_config(self, resolver_dir: Path) -> str:
        """The part of nats-server's configuration that turns authentication on: the
        operator, the system account, and a resolver that stores account JWTs in
        `resolver_dir` and takes pushed updates (revocations) from the system account."""
        return (
            f"operator: {self.operator_jwt()}\n"
            f"system_account: {self.system_account}\n"
            "resolver: {\n"
            "  type: full\n"
            f"  dir: {json.dumps(str(resolver_dir))}\n"
            "  allow_delete: false\n"
            "  interval: \"2m\"\n"
            "  timeout: \"1.9s\"\n"
            "}\n"
            "resolver_preload: {\n"
            f"  {self.system_account}: {self.system_account_jwt()}\n"
            f"  {self.account}: {self.account_jwt()}\n"
            "}\n")


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps its mode through O_CREAT: narrow it first
    with os.fdopen(fd, "w") as f:
        f.write(text)
