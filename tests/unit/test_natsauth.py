"""The NATS authority's pure parts: keys, JWTs, credentials, identities, revocation plans."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import EVENT_TYPES
from schemas.subjects import BILLING_SETTLE, STREAMS, stream_for_subject, subject_matches
from services.infra.natsauth import identities
from services.infra.natsauth.authority import Authority, NodeIssuer
from services.infra.natsauth.creds import Credentials, CredentialsError
from services.infra.natsauth.identities import (
    NODE_PUBLISHES,
    NODE_SCOPE,
    SERVICES,
    Role,
    control_plane_subjects,
    permissions,
)
from services.infra.natsauth.jwt import JwtError, Permissions, decode, encode, user_claims
from services.infra.natsauth.keys import KeyKind, kind_of, new_seed, public_key, sign, verify
from services.infra.natsauth.revocations import resign, revised, revocations_of
from services.orchestrator.credentials import (
    EndedNode,
    RevocationPlan,
    needs_sync,
    plan_revocations,
    refusal_reason,
)


def may(allowed: tuple[str, ...], subject: str) -> bool:
    return any(subject_matches(a, subject) for a in allowed)


# --------------------------------------------------------------------------- keys and JWTs


def test_seeds_make_keys_of_their_kind_that_sign_and_verify() -> None:
    for kind, letter in ((KeyKind.OPERATOR, "O"), (KeyKind.ACCOUNT, "A"), (KeyKind.USER, "U")):
        seed = new_seed(kind)
        key = public_key(seed)
        assert seed.startswith("S" + letter) and key.startswith(letter)
        assert kind_of(key) is kind
        signature = sign(seed, b"hello")
        assert verify(key, b"hello", signature)
        assert not verify(key, b"hellO", signature)
        assert not verify(public_key(new_seed(kind)), b"hello", signature)
    assert not verify("not-a-key", b"x", b"y" * 64)


def test_a_jwt_is_signed_by_its_issuer_and_any_change_breaks_it() -> None:
    seed = new_seed(KeyKind.ACCOUNT)
    token = encode({"sub": "UXXX", "name": "n", "iat": 1}, seed)
    claims = decode(token)
    assert claims["iss"] == public_key(seed) and claims["sub"] == "UXXX"
    assert len(claims["jti"]) == 52  # base32 of a 32-byte hash, unpadded
    head, _, signature = token.split(".")
    forged = encode({"sub": "UYYY", "name": "n", "iat": 1}, seed).split(".")[1]
    with pytest.raises(JwtError):
        decode(f"{head}.{forged}.{signature}")
    with pytest.raises(JwtError):
        decode("a.b")
    assert encode({"sub": "UXXX", "name": "n", "iat": 1}, seed) == token  # deterministic


def test_user_claims_carry_permissions_and_limits_only_when_not_scoped() -> None:
    plain = user_claims(name="x", user="U", issuer_account="A", issued_at=5,
                        permissions=Permissions(pub_allow=("a.>",), responses=1,
                                                response_ttl_seconds=2))
    assert plain["nats"]["pub"] == {"allow": ["a.>"]}
    assert plain["nats"]["resp"] == {"max": 1, "ttl": 2_000_000_000}
    assert plain["nats"]["subs"] == -1 and "exp" not in plain
    scoped = user_claims(name="x", user="U", issuer_account="A", issued_at=5, expires_at=9)
    assert "pub" not in scoped["nats"] and "subs" not in scoped["nats"] and scoped["exp"] == 9


# --------------------------------------------------------------------------- credentials


def test_credentials_round_trip_and_never_show_their_seed(tmp_path: Path) -> None:
    authority = Authority.create()
    creds = authority.user(Role.GATEWAY)
    again = Credentials.parse(creds.text())
    assert again == creds and again.role is Role.GATEWAY and again.name == "gateway"
    assert creds.seed not in repr(creds) and creds.seed not in repr(authority)
    assert creds.inbox_prefix == "_INBOX.gateway"
    with pytest.raises(CredentialsError):
        Credentials.parse("nothing here")
    with pytest.raises(CredentialsError):  # a seed that is not the JWT's user
        Credentials(creds.jwt, new_seed(KeyKind.USER))


def test_an_authority_saved_and_loaded_is_the_same_and_its_files_are_private(
        tmp_path: Path) -> None:
    authority = Authority.create()
    authority.save(tmp_path / "auth")
    again = Authority.load(tmp_path / "auth")
    assert again.account == authority.account and again.operator == authority.operator
    assert again.account_jwt() == authority.account_jwt()
    for path in (tmp_path / "auth").rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path
    for role in (*SERVICES, Role.PROVISIONER, Role.OBSERVER, Role.ADMIN):
        creds = Credentials.parse((tmp_path / "auth" / "creds" / f"{role.value}.creds")
                                  .read_text())
        claims = decode(creds.jwt)
        assert claims["iss"] == authority.account and creds.role is role


def test_a_node_credential_is_issued_by_the_scoped_key_for_one_node_and_expires() -> None:
    authority = Authority.create()
    issuer = NodeIssuer.from_json(authority.node_issuer().to_json())
    node = uuid.uuid4()
    creds = issuer.node_credentials(node, ttl_seconds=60, now=1_000)
    claims = decode(creds.jwt)
    account = decode(authority.account_jwt())
    (scope,) = account["nats"]["signing_keys"]
    assert claims["iss"] == scope["key"] and scope["kind"] == "user_scope"
    assert claims["name"] == str(node) and claims["exp"] == 1_060
    assert claims["nats"]["issuer_account"] == authority.account
    assert "pub" not in claims["nats"]  # the scope decides, whatever the JWT would say
    assert creds.role is Role.NODE and creds.inbox_prefix == f"_INBOX_NODE.{node}"
    assert issuer.node_signing_seed not in repr(issuer)
    with pytest.raises(ValueError, match="NATS_NODE_ISSUER"):
        NodeIssuer.from_json("{}")


def test_the_server_configuration_names_the_operator_and_preloads_both_accounts(
        tmp_path: Path) -> None:
    authority = Authority.create()
    conf = authority.server_config(tmp_path / "accounts")
    assert f"operator: {authority.operator_jwt()}" in conf
    assert f"system_account: {authority.system_account}" in conf
    assert f"{authority.account}: {authority.account_jwt()}" in conf
    assert "type: full" in conf and "allow_delete: false" in conf
    operator = decode(authority.operator_jwt())
    assert operator["iss"] == authority.operator == operator["sub"]
    assert decode(authority.account_jwt())["iss"] in operator["nats"]["signing_keys"]


# --------------------------------------------------------------------------- identities


NODE = "0190b5a4-7c1e-7000-8000-000000000001"


def node_allowed(kind: str) -> tuple[str, ...]:
    p = NODE_SCOPE
    return tuple(s.replace("{{name()}}", NODE) for s in (p.pub_allow if kind == "pub"
                                                          else p.sub_allow))


def test_a_node_speaks_only_of_itself_and_hears_only_what_is_said_to_it() -> None:
    pub, sub = node_allowed("pub"), node_allowed("sub")
    for t in NODE_PUBLISHES:
        assert may(pub, f"{t}.{NODE}")
        assert not may(pub, f"{t}.0190b5a4-7c1e-7000-8000-000000000002")
    # Its vLLM's KV cache events, on its own subject only.
    assert may(pub, f"node.kv_events.{NODE}")
    assert not may(pub, "node.kv_events.0190b5a4-7c1e-7000-8000-000000000002")
    for subject in ("usage.recorded.t", "node.status_changed." + NODE, "node.accepted." + NODE,
                    "node.ack." + NODE, "apikey.created.t", "$JS.API.STREAM.DELETE.NODES",
                    "$JS.API.INFO", "node.command.other", "_INBOX.gateway.x", ">"):
        assert not may(pub, subject), subject
    assert may(sub, f"node.ack.{NODE}") and may(sub, f"node.command.{NODE}")
    assert may(sub, f"_INBOX_NODE.{NODE}.abc.1")
    for subject in ("node.ack.other", "node.>", "_INBOX.>", "_INBOX.gateway.x",
                    "$JS.API.CONSUMER.MSG.NEXT.CONTROL.x", "tenant.created.x", "usage.>"):
        assert not may(sub, subject), subject
    assert NODE_SCOPE.responses == 1 and NODE_SCOPE.payload == 64 * 1024


def test_only_the_gateways_publish_usage_and_only_the_relay_the_control_plane() -> None:
    for role in Role:
        if role in (Role.NODE, Role.ADMIN, Role.LEAF):
            continue
        pub = permissions(role).pub_allow
        assert may(pub, "usage.recorded.t") == (role is Role.GATEWAY), role
        for subject in ("tenant.created.t", "apikey.created.t", "node.status_changed.n",
                        "node.launching.n", "node.accepted.n", "deployment.created.d"):
            assert may(pub, subject) == (role is Role.RELAY), (role, subject)
        assert not any(may(pub, f"{t}.n") for t in NODE_PUBLISHES), role
        for destructive in ("$JS.API.STREAM.DELETE.USAGE", "$JS.API.STREAM.PURGE.CONTROL",
                            "$JS.API.CONSUMER.DELETE.USAGE.billing-usage"):
            assert not may(pub, destructive), (role, destructive)


def test_the_relay_may_publish_every_control_plane_event_and_nothing_nodes_say() -> None:
    subjects = control_plane_subjects()
    for event_type in EVENT_TYPES:
        relayed = may(subjects, f"{event_type}.x")
        said_by_others = event_type in NODE_PUBLISHES or event_type.startswith("usage.")
        assert relayed != said_by_others, event_type
        assert stream_for_subject(f"{event_type}.x") is not None


def test_only_the_gateways_hear_the_nodes_kv_cache_events() -> None:
    for role in Role:
        if role in (Role.NODE, Role.ADMIN, Role.LEAF):
            continue
        hears = may(permissions(role).sub_allow, f"node.kv_events.{NODE}")
        # The orchestrator's `node.*.*` covers them; it subscribes only to what wakes it.
        assert hears == (role in (Role.GATEWAY, Role.ORCHESTRATOR)), role
        assert not may(permissions(role).pub_allow, f"node.kv_events.{NODE}"), role


def test_only_the_admin_api_asks_billing_to_settle_and_only_billing_hears_it() -> None:
    for role in Role:
        if role in (Role.NODE, Role.ADMIN, Role.LEAF):
            continue
        p = permissions(role)
        assert may(p.pub_allow, BILLING_SETTLE) == (role is Role.ADMIN_API), role
        assert may(p.sub_allow, BILLING_SETTLE) == (role is Role.BILLING), role
    assert permissions(Role.BILLING).responses == 1
    assert not may(NODE_SCOPE.pub_allow, BILLING_SETTLE)
    # A core request/reply subject: no stream may capture it (it would answer for billing).
    assert stream_for_subject(BILLING_SETTLE) is None


def test_every_identity_reads_only_its_own_inbox() -> None:
    inboxes = {}
    for role in Role:
        if role in (Role.NODE, Role.ADMIN, Role.LEAF):
            continue
        sub = permissions(role).sub_allow
        assert may(sub, f"_INBOX.{role.value}.x.1"), role
        inboxes[role] = [other for other in Role
                         if other not in (role, Role.NODE, Role.ADMIN, Role.LEAF)
                         and may(sub, f"_INBOX.{other.value}.x.1")]
        assert not may(sub, f"_INBOX_NODE.{NODE}.x"), role
    assert all(not others for others in inboxes.values()), inboxes


def test_a_leaf_link_carries_only_what_nodes_say_and_what_is_said_to_them() -> None:
    p = permissions(Role.LEAF)
    for t in (*NODE_PUBLISHES, "node.kv_events"):
        assert may(p.pub_allow, f"{t}.{NODE}")
    for subject in ("usage.recorded.t", "node.status_changed.n", "node.accepted.n",
                    "apikey.created.t", "$JS.API.INFO", "node.ack.n", "_INBOX.gateway.x"):
        assert not may(p.pub_allow, subject), subject
    for subject in (f"node.ack.{NODE}", f"node.command.{NODE}", f"_INBOX_NODE.{NODE}.x.1"):
        assert may(p.sub_allow, subject)
    for subject in ("tenant.created.t", "usage.recorded.t", "_INBOX.gateway.x", "node.>"):
        assert not may(p.sub_allow, subject), subject


def test_readers_replay_mirrors_never_a_stream_with_durable_consumers() -> None:
    """A grant to create consumers on a stream reaches its durable consumers too (NATS cannot
    narrow it to unnamed ones): readers get mirrors."""
    durable_streams = {"NODES", "USAGE", "CONTROL"}
    for role in Role:
        if role in (Role.NODE, Role.ADMIN, Role.PROVISIONER):
            continue
        for stream in durable_streams:
            mine = {"MONITOR": {"NODES"}, "NOTIFIER": {"NODES", "CONTROL"},
                    "BILLING": {"USAGE"}}.get(role.name, set())
            assert not may(permissions(role).pub_allow,
                           f"$JS.API.CONSUMER.CREATE.{stream}") or stream in mine, (role, stream)
    with pytest.raises(ValueError, match="mirror"):
        identities._read("NODES")


def test_nothing_allowed_is_said_as_everything_denied() -> None:
    """NATS reads a missing allow list as "everything"."""
    claims = Permissions(pub_allow=("a.b",)).claims()
    assert claims["sub"] == {"deny": [">"]} and claims["pub"] == {"allow": ["a.b"]}
    account = decode(Authority.create().account_jwt())
    assert account["nats"]["default_permissions"] == {"pub": {"deny": [">"]},
                                                      "sub": {"deny": [">"]}}
    (scope,) = account["nats"]["signing_keys"]
    assert scope["template"]["allowed_connection_types"] == ["STANDARD"]


def test_only_the_provisioner_and_admin_change_streams() -> None:
    for role in Role:
        if role is Role.NODE:
            continue
        pub = permissions(role).pub_allow
        for stream in STREAMS:
            can = may(pub, f"$JS.API.STREAM.UPDATE.{stream.name}")
            assert can == (role in (Role.PROVISIONER, Role.ADMIN)), (role, stream.name)


def test_the_observer_subscribes_but_never_says_an_event() -> None:
    p = permissions(Role.OBSERVER)
    for event_type in EVENT_TYPES:
        assert not may(p.pub_allow, f"{event_type}.x")
        assert may(p.sub_allow, f"{event_type}.x")
    assert not may(p.sub_allow, "_INBOX.gateway.x")


# --------------------------------------------------------------------------- revocations


def test_revised_adds_forgets_and_says_when_nothing_changes() -> None:
    assert revised({"U1": 5}, {"U1": 5}, ()) is None
    assert revised({"U1": 5}, {"U2": 7}, ()) == {"U1": 5, "U2": 7}
    assert revised({"U1": 5}, {"U1": 9}, ()) == {"U1": 9}
    assert revised({"U1": 5, "U2": 6}, {}, {"U1"}) == {"U2": 6}
    assert revised({}, {"U1": 5}, {"U1"}) is None


def test_resign_keeps_the_account_and_moves_its_issue_time_forward() -> None:
    authority = Authority.create()
    issuer = authority.node_issuer()
    current = authority.account_jwt(issued_at=100)
    updated = resign(current, {"UABC": 150}, signing_seed=issuer.operator_signing_seed, now=90)
    claims, before = decode(updated), decode(current)
    assert claims["iat"] == 101  # never older than what the servers hold
    assert revocations_of(updated) == {"UABC": 150}
    assert claims["nats"]["signing_keys"] == before["nats"]["signing_keys"]
    assert claims["nats"]["limits"] == before["nats"]["limits"]
    assert claims["sub"] == authority.account and claims["iss"] == before["iss"]
    assert revocations_of(resign(updated, {}, signing_seed=issuer.operator_signing_seed,
                                 now=200)) == {}


NOW = datetime(2026, 12, 4, tzinfo=UTC)


def at(when: datetime) -> int:
    return int(when.timestamp())


def test_plan_revokes_ended_nodes_at_their_credentials_expiry() -> None:
    day = NOW + timedelta(days=1)
    plan = plan_revocations(
        [EndedNode("U1", day), EndedNode("U2", NOW - timedelta(seconds=1)),
         EndedNode("", None), EndedNode("U3", None), EndedNode("U5", NOW)],
        held={}, known=[], now=NOW)
    # At the expiry, not at now: the same whenever (and by whichever leader) it is planned.
    assert plan.revoke == {"U1": at(day), "U3": at(NOW)}
    assert plan.forget == frozenset()
    later = plan_revocations([EndedNode("U1", day)], held={}, known=[],
                             now=NOW + timedelta(hours=5))
    assert later.revoke == {"U1": at(day)}


def test_plan_keeps_what_the_servers_hold_as_it_is() -> None:
    """A held revocation is never re-pushed, whatever its time (an operator's "at now", an
    older leader's): a verification of an unchanged fleet pushes nothing."""
    day = NOW + timedelta(days=1)
    plan = plan_revocations([EndedNode("U1", day), EndedNode("U2", day)],
                            held={"U1": at(NOW) - 50, "UOPERATOR": 7},
                            known=[EndedNode("U1", day)], now=NOW)
    assert plan.revoke == {"U2": at(day)} and plan.forget == frozenset()
    assert revised({"U1": at(NOW) - 50}, plan.revoke, plan.forget) == \
        {"U1": at(NOW) - 50, "U2": at(day)}
    unchanged = plan_revocations([EndedNode("U1", day)], held={"U1": at(day)},
                                 known=[EndedNode("U1", day)], now=NOW + timedelta(minutes=1))
    assert not unchanged.revoke and not unchanged.forget


def test_plan_forgets_only_node_credentials_expired_longer_than_the_margin() -> None:
    margin = timedelta(minutes=10)
    held = {"UOLD": 1, "UJUST": 2, "UALIVE": 3, "UOPERATOR": 4, "UNOEXP": 5}
    known = [EndedNode("UOLD", NOW - margin - timedelta(seconds=1)),
             EndedNode("UJUST", NOW - margin + timedelta(seconds=1)),
             EndedNode("UALIVE", NOW + timedelta(days=3)),
             EndedNode("UNOEXP", None),
             EndedNode("UNOTHELD", NOW - timedelta(days=1))]
    plan = plan_revocations([], held, known, NOW, forget_after=margin)
    # UOPERATOR is not a node credential the nodes table knows (a revoked service
    # credential, which may never expire): never forgotten.
    assert plan.forget == {"UOLD"} and not plan.revoke
    assert plan_revocations([], held, known, NOW, forget_after=timedelta(0)).forget == \
        {"UOLD", "UJUST"}
    assert plan_revocations([], held, known, NOW + timedelta(seconds=2),
                            forget_after=margin).forget == {"UOLD", "UJUST"}


def test_plan_puts_back_what_a_racing_push_dropped_unless_it_is_forgettable() -> None:
    day = NOW + timedelta(days=1)
    old = NOW - timedelta(hours=1)
    seen = {"UMINE": at(day), "UOPERATOR": 42, "UOLD": at(old), "UHELD": 1}
    plan = plan_revocations([EndedNode("UMINE", day)], held={"UHELD": 9},
                            known=[EndedNode("UMINE", day), EndedNode("UOLD", old)],
                            now=NOW, seen=seen)
    # Put back with the time they had; the held one stays as the servers have it.
    assert plan.revoke == {"UMINE": at(day), "UOPERATOR": 42}
    assert plan.forget == frozenset()


def test_the_leader_talks_to_nats_only_when_it_has_something_to_say_or_to_check() -> None:
    nothing = RevocationPlan({}, frozenset())
    assert needs_sync(None, since_verified=0.0, verify_every=60)  # a new leader looks
    assert not needs_sync(nothing, since_verified=59.9, verify_every=60)
    assert needs_sync(nothing, since_verified=60.0, verify_every=60)
    assert needs_sync(RevocationPlan({"U1": 5}, frozenset()), since_verified=0.0,
                      verify_every=60)
    assert needs_sync(RevocationPlan({}, frozenset({"U1"})), since_verified=0.0,
                      verify_every=60)
    # An unchanged fleet: the planner finds nothing against what was verified, so a tick
    # between verifications stays off NATS.
    day = NOW + timedelta(days=1)
    held = {"U1": at(day)}
    assumed = plan_revocations([EndedNode("U1", day)], held, [EndedNode("U1", day)],
                               NOW + timedelta(minutes=3))
    assert not needs_sync(assumed, since_verified=5.0, verify_every=60)


def test_connection_advisories_are_counted_only_when_they_are_refusals() -> None:
    assert refusal_reason(b'{"reason": "Authentication Failure"}', refused=True) == \
        "authentication_failure"
    assert refusal_reason(b'{"reason": "Credentials Revoked"}', refused=False) == \
        "credentials_revoked"
    assert refusal_reason(b'{"reason": "Client Closed"}', refused=False) is None
    assert refusal_reason(b'{"reason": "Something New"}', refused=True) == "other"
    assert refusal_reason(b"not json", refused=False) is None
