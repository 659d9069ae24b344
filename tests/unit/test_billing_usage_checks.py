"""What billing accepts as a usage record (services/billing/usage_checks.py), every case."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from schemas.events import UsageRecorded
from services.billing.usage_checks import KeyOwner, UsageRefusedBecause, check_usage

T, E, K = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
OWNER = KeyOwner(tenant_id=T, environment_id=E, environment_tenant_id=T, tenant_exists=True)
MAX = 1000


def usage(**change: object) -> UsageRecorded:
    event = UsageRecorded(request_id="r", tenant_id=T, environment_id=E, api_key_id=K,
                          model="m", endpoint="chat", region="r", node_id=None,
                          prompt_tokens=10, completion_tokens=20, latency_ms=1.0)
    return msgspec.structs.replace(event, **change) if change else event


def because(event: UsageRecorded, owner: KeyOwner | None = OWNER) -> UsageRefusedBecause | None:
    refused = check_usage(event, owner, MAX)
    return None if refused is None else refused.because


def test_usage_of_a_key_of_that_environment_of_that_tenant_is_accepted() -> None:
    assert because(usage()) is None
    assert because(usage(prompt_tokens=0, completion_tokens=0)) is None
    assert because(usage(prompt_tokens=MAX - 1, completion_tokens=1)) is None


@pytest.mark.parametrize(("prompt", "completion"), [(-1, 0), (0, -1), (-5, 100)])
def test_negative_token_counts_are_refused(prompt: int, completion: int) -> None:
    assert because(usage(prompt_tokens=prompt, completion_tokens=completion)) \
        is UsageRefusedBecause.NEGATIVE_TOKENS


@pytest.mark.parametrize(("prompt", "completion"), [(MAX + 1, 0), (0, MAX + 1), (MAX, 1),
                                                    (10**18, 10**18)])
def test_more_tokens_than_the_ceiling_are_refused(prompt: int, completion: int) -> None:
    assert because(usage(prompt_tokens=prompt, completion_tokens=completion)) \
        is UsageRefusedBecause.TOO_MANY_TOKENS


def test_an_unknown_key_is_refused() -> None:
    assert because(usage(), None) is UsageRefusedBecause.UNKNOWN_IDS


def test_a_key_of_an_environment_or_tenant_that_does_not_exist_is_refused() -> None:
    no_env = KeyOwner(tenant_id=T, environment_id=E, environment_tenant_id=None,
                      tenant_exists=True)
    no_tenant = KeyOwner(tenant_id=T, environment_id=E, environment_tenant_id=T,
                         tenant_exists=False)
    assert because(usage(), no_env) is UsageRefusedBecause.UNKNOWN_IDS
    assert because(usage(), no_tenant) is UsageRefusedBecause.UNKNOWN_IDS


@pytest.mark.parametrize("change", [
    {"tenant_id": uuid.uuid4()}, {"environment_id": uuid.uuid4()},
    {"tenant_id": uuid.uuid4(), "environment_id": uuid.uuid4()}], ids=str)
def test_ids_that_do_not_belong_together_are_refused(change: dict[str, object]) -> None:
    """Another tenant's usage billed to this key, or this key's usage to another tenant."""
    assert because(usage(**change)) is UsageRefusedBecause.MISMATCHED_IDS


def test_a_key_whose_environment_belongs_to_another_tenant_is_refused() -> None:
    crossed = KeyOwner(tenant_id=T, environment_id=E, environment_tenant_id=uuid.uuid4(),
                       tenant_exists=True)
    assert because(usage(), crossed) is UsageRefusedBecause.MISMATCHED_IDS


def test_counts_are_checked_before_ids() -> None:
    assert because(usage(prompt_tokens=-1), None) is UsageRefusedBecause.NEGATIVE_TOKENS
