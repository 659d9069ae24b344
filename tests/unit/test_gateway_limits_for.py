"""Which limits apply to a request: the key's, its environment's or the default, the
platform's (pure)."""

from __future__ import annotations

from services.gateway.auth import Principal
from services.gateway.routes import limits_for
from services.gateway.settings import GatewaySettings


def principal(**limits: int | None) -> Principal:
    base: dict[str, int | None] = dict(
        key_requests_per_minute=None, key_tokens_per_minute=None, key_tokens_per_day=None,
        key_concurrency=None, environment_requests_per_minute=None,
        environment_tokens_per_minute=None, environment_tokens_per_day=None)
    base.update(limits)
    return Principal(key_id="k", tenant_id="t", environment_id="e", role="developer",
                     region="us-east-1", key_status="active", tenant_status="active",
                     environment_status="active", expires_at=None, **base)


SETTINGS = GatewaySettings(environment_requests_per_minute=10_000,
                           tenant_requests_per_minute=50_000, global_requests_per_minute=0)


def test_an_environment_without_a_quota_gets_the_default() -> None:
    limits = limits_for(principal(), SETTINGS)
    assert limits.environment_requests_per_minute == 10_000
    assert limits.tenant_requests_per_minute == 50_000
    assert limits.global_requests_per_minute is None  # 0 in settings: no global layer


def test_an_environment_quota_of_zero_pauses_it_rather_than_taking_the_default() -> None:
    assert limits_for(principal(environment_requests_per_minute=0),
                      SETTINGS).environment_requests_per_minute == 0
    assert limits_for(principal(environment_requests_per_minute=7),
                      SETTINGS).environment_requests_per_minute == 7


def test_the_keys_own_limits_pass_through() -> None:
    limits = limits_for(principal(key_requests_per_minute=3, key_concurrency=2,
                                  key_tokens_per_day=9), SETTINGS)
    assert (limits.key_requests_per_minute, limits.key_concurrency,
            limits.key_tokens_per_day) == (3, 2, 9)
