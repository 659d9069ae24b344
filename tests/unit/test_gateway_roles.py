"""What each API key role may do on the public API, and how far a tenant admin may grant."""

from __future__ import annotations

import pytest

from schemas.events import Quota
from services.domain.catalog.bodies import Role
from services.gateway.roles import ROLES, Action, allowed, quota_above, refusal, within


@pytest.mark.parametrize(("role", "may"), [
    ("readonly", {Action.READ}),
    ("developer", {Action.READ, Action.INFER}),
    ("admin", {Action.READ, Action.INFER, Action.MANAGE}),
    ("", set()), ("owner", set()), ("Admin", set()),  # unknown: nothing at all
])
def test_each_role_may_do_exactly_its_actions(role: str, may: set[Action]) -> None:
    assert {a for a in Action if allowed(role, a)} == may


def test_the_roles_are_the_ones_keys_are_made_with() -> None:
    assert set(ROLES) == set(Role.__args__)  # type: ignore[attr-defined]


def test_a_refusal_says_what_was_refused_and_what_would_do() -> None:
    message = refusal("readonly", Action.INFER)
    assert "'readonly'" in message and "run inference" in message
    assert "'developer' or 'admin'" in message
    assert "'admin' role" in refusal("developer", Action.MANAGE)


def test_a_limit_above_the_ceiling_is_named() -> None:
    ceiling = Quota(requests_per_minute=100, tokens_per_day=10_000)
    assert quota_above(Quota(requests_per_minute=100), ceiling) is None
    assert quota_above(Quota(requests_per_minute=101), ceiling) == "requests_per_minute"
    assert quota_above(Quota(tokens_per_day=10_001), ceiling) == "tokens_per_day"
    # Unset on either side bounds nothing; concurrency has no environment ceiling.
    assert quota_above(Quota(), ceiling) is None
    assert quota_above(Quota(tokens_per_minute=10**9), ceiling) is None
    assert quota_above(Quota(concurrency=10**6), ceiling) is None
    assert quota_above(Quota(requests_per_minute=10**9), Quota()) is None


def test_an_environment_made_within_a_ceiling_takes_its_unset_limits() -> None:
    ceiling = Quota(requests_per_minute=100, tokens_per_minute=5_000)
    assert within(Quota(requests_per_minute=10), ceiling) == Quota(
        requests_per_minute=10, tokens_per_minute=5_000)
    assert within(Quota(), Quota()) == Quota()
