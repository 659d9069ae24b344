"""What an API key's role lets it do on the public API, and how far a tenant admin may go.
Pure: no I/O.

- `readonly` reads: `GET /v1/models`, `GET /v1/usage`, `GET /v1/responses/{id}`. It cannot
  spend.
- `developer` also runs inference (chat, completions, embeddings).
- `admin` also manages its own tenant's keys and environments (list, create, revoke,
  rotate: services/gateway/self_service.py); listing keys is management too, as what a
  tenant's keys are and can do is for its admins to see.

A role the platform does not know (a row written by an older or newer version) can do nothing:
the safe side of a misunderstanding.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from schemas.events import Quota

__all__ = ["LIMIT_FIELDS", "ROLES", "Action", "allowed", "quota_above", "refusal", "within"]


class Action(enum.StrEnum):
    READ = "read"
    INFER = "infer"
    MANAGE = "manage"


ROLES: dict[str, frozenset[Action]] = {
    "readonly": frozenset({Action.READ}),
    "developer": frozenset({Action.READ, Action.INFER}),
    "admin": frozenset({Action.READ, Action.INFER, Action.MANAGE}),
}

_WHAT = {Action.READ: "read this tenant's data", Action.INFER: "run inference",
         Action.MANAGE: "manage this tenant's API keys and environments"}
_NEEDS = {Action.READ: "any role", Action.INFER: "the 'developer' or 'admin' role",
          Action.MANAGE: "the 'admin' role"}


def allowed(role: str, action: Action) -> bool:
    return action in ROLES.get(role, frozenset())


def refusal(role: str, action: Action) -> str:
    """The 403's message: what was refused, and what would be allowed."""
    return (f"This API key has the '{role}' role, which may not {_WHAT[action]}; "
            f"that needs {_NEEDS[action]}.")


LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")
"""The dimensions an environment's quota bounds (a key's `concurrency` has no environment
ceiling)."""


def quota_above(asked: Quota, ceiling: Quota,
                fields: Iterable[str] = LIMIT_FIELDS) -> str | None:
    """The first of `fields` where `asked` sets a limit above the one `ceiling` sets (None:
    none does). A dimension either leaves unset bounds nothing here: a key's unset limit is
    still held by its environment's at every request."""
    for field in fields:
        limit, value = getattr(ceiling, field), getattr(asked, field)
        if limit is not None and value is not None and value > limit:
            return field
    return None


def within(asked: Quota, ceiling: Quota) -> Quota:
    """An environment's quota made by a tenant admin: what it asks, each dimension it leaves
    unset taking the ceiling's (unset would mean the platform's default, which may be more)."""
    return Quota(**{field: getattr(asked, field) if getattr(asked, field) is not None
                    else getattr(ceiling, field) for field in LIMIT_FIELDS})
