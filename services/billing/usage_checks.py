"""What billing accepts as a usage record. Pure.

Usage arrives over NATS from the gateways, and only from them (NATS permissions), but a
leaked gateway credential must still not bill a tenant for what it did not use: the token
counts must be plausible, and the tenant, environment and API key must exist and belong
together (the key to that environment, the environment to that tenant). The price is never
taken from the message: billing always prices from the catalog (prices.py).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from schemas.events import UsageRecorded

__all__ = ["KeyOwner", "UsageRefused", "UsageRefusedBecause", "check_usage"]


class UsageRefusedBecause(enum.StrEnum):
    """`billing_usage_refused_total`'s reasons."""

    NEGATIVE_TOKENS = "negative_tokens"
    TOO_MANY_TOKENS = "too_many_tokens"
    UNKNOWN_IDS = "unknown_ids"
    MISMATCHED_IDS = "mismatched_ids"
    UNKNOWN_MODEL = "unknown_model"


@dataclass(frozen=True)
class UsageRefused:
    because: UsageRefusedBecause
    reason: str


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """Who an API key belongs to, as the catalog's projections say. An id is None when the
    catalog has no such row (an environment or tenant that does not exist)."""

    tenant_id: uuid.UUID
    environment_id: uuid.UUID
    environment_tenant_id: uuid.UUID | None
    """The tenant the key's environment belongs to (None: no such environment)."""
    tenant_exists: bool


def check_usage(event: UsageRecorded, owner: KeyOwner | None,
                max_tokens: int) -> UsageRefused | None:
    """Why billing must not record `event` (None: it may). `owner`: the catalog's record of
    the event's API key (None: no such key); `max_tokens`: the most tokens one record may
    carry (prompt and completion together)."""
    if event.prompt_tokens < 0 or event.completion_tokens < 0:
        return UsageRefused(UsageRefusedBecause.NEGATIVE_TOKENS,
                            f"negative token counts ({event.prompt_tokens}, "
                            f"{event.completion_tokens})")
    if event.prompt_tokens + event.completion_tokens > max_tokens:
        return UsageRefused(UsageRefusedBecause.TOO_MANY_TOKENS,
                            f"{event.prompt_tokens + event.completion_tokens} tokens in one "
                            f"record, more than {max_tokens}")
    if owner is None:
        return UsageRefused(UsageRefusedBecause.UNKNOWN_IDS,
                            f"no API key {event.api_key_id}")
    if owner.environment_tenant_id is None or not owner.tenant_exists:
        return UsageRefused(UsageRefusedBecause.UNKNOWN_IDS,
                            f"API key {event.api_key_id} of an environment or tenant that "
                            "does not exist")
    if (owner.environment_id != event.environment_id or owner.tenant_id != event.tenant_id
            or owner.environment_tenant_id != event.tenant_id):
        return UsageRefused(UsageRefusedBecause.MISMATCHED_IDS,
                            f"API key {event.api_key_id} does not belong to environment "
                            f"{event.environment_id} of tenant {event.tenant_id}")
    return None
