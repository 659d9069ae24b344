"""Request and response bodies of the catalog's keys and environments, shared by the admin API
and the public API's tenant self-service routes (services/gateway/self_service.py): one
definition of what a key or an environment may be made with, so the two cannot drift.

Request bodies forbid unknown fields (a typo is a 400, not a silently ignored change).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from schemas.events import Quota
from services.domain.catalog.api_keys import KEEP, Keep
from services.domain.catalog.queries import ApiKeyRecord, EnvironmentRecord
from services.infra.page import Page
from services.infra.request_checks import INT32_MAX, INT64_MAX, NO_NUL, check_future

__all__ = ["INT32_MAX", "INT64_MAX", "WHOLE_NUMBER", "ApiKeyList", "AwareTime", "Body",
           "Concurrency", "EnvironmentCreate", "EnvironmentList", "FutureTime", "KeyCreate",
           "KeyRotate", "KeyWithSecret", "LimitsCreate", "Name", "OptionalName", "QuotaCreate",
           "Reason", "Region", "Requests", "Role", "StatusChange", "Tokens"]

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]
OptionalName = Annotated[str, Meta(max_length=200, pattern=NO_NUL)]
Reason = Annotated[str, Meta(max_length=1000, pattern=NO_NUL)]
Region = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             examples=["us-east-1"])]
WHOLE_NUMBER = ("a JSON integer as written: 16, not 16.0 nor 1.6e1 (a number with a fraction "
                "or an exponent is a 400, as in OpenAI's API)")
"""The description of every integer field: JSON Schema counts 16.0 as an integer, this API
does not (docs/admin-api.md, "Bounded input")."""
Requests = Annotated[int, Meta(ge=0, le=INT32_MAX, description=f"per minute; {WHOLE_NUMBER}")]
Tokens = Annotated[int, Meta(ge=0, le=INT64_MAX, description=WHOLE_NUMBER)]
Concurrency = Annotated[int, Meta(ge=0, le=INT32_MAX,
                                  description=f"requests at once; {WHOLE_NUMBER}")]
AwareTime = Annotated[datetime, Meta(tz=True, description="ISO-8601 with a time zone")]
FutureTime = Annotated[datetime, Meta(
    tz=True, description="ISO-8601 with a time zone; it must be in the future when sent "
                         "(400 otherwise) and at most year 9999 in UTC")]
Role = Literal["admin", "developer", "readonly"]


class Body(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of every request body."""


class StatusChange(Body, frozen=True, kw_only=True):
    """Suspend, reactivate, revoke: why, for the event log."""

    reason: Reason = ""


class QuotaCreate(Body, frozen=True, kw_only=True):
    """null (or absent): the platform's default at the environment level."""

    requests_per_minute: Requests | None = None
    tokens_per_minute: Tokens | None = None
    tokens_per_day: Tokens | None = None

    def quota(self) -> Quota:
        return Quota(requests_per_minute=self.requests_per_minute,
                     tokens_per_minute=self.tokens_per_minute,
                     tokens_per_day=self.tokens_per_day)


class EnvironmentCreate(Body, frozen=True, kw_only=True):
    name: Name
    region: Region
    quota: QuotaCreate = msgspec.field(default_factory=QuotaCreate)


class LimitsCreate(Body, frozen=True, kw_only=True):
    """null (or absent): no limit at the key's own level."""

    requests_per_minute: Requests | None = None
    tokens_per_minute: Tokens | None = None
    tokens_per_day: Tokens | None = None
    concurrency: Concurrency | None = None

    def quota(self) -> Quota:
        return Quota(requests_per_minute=self.requests_per_minute,
                     tokens_per_minute=self.tokens_per_minute,
                     tokens_per_day=self.tokens_per_day, concurrency=self.concurrency)


class KeyCreate(Body, frozen=True, kw_only=True):
    name: OptionalName = ""
    role: Role = "developer"
    limits: LimitsCreate = msgspec.field(default_factory=LimitsCreate)
    expires_at: FutureTime | None = None

    def expiry(self, now: datetime) -> datetime | None:
        """`expires_at`, which must be after `now` (FieldError)."""
        return None if self.expires_at is None else \
            check_future(self.expires_at, "expires_at", now)


class KeyRotate(Body, frozen=True, kw_only=True):
    """`expires_at` is the successor's expiry: a time to set one, null for none; left out,
    the old key's (which must not have passed)."""

    reason: Reason = ""
    expires_at: FutureTime | UnsetType | None = UNSET

    def expiry(self, now: datetime) -> datetime | Keep | None:
        """The successor's expiry for `Catalog.rotate_api_key`: KEEP when left out."""
        if isinstance(self.expires_at, UnsetType):
            return KEEP
        return None if self.expires_at is None else \
            check_future(self.expires_at, "expires_at", now)


class KeyWithSecret(ApiKeyRecord, frozen=True, kw_only=True):
    """A key just made: the record plus the plaintext `key`, shown this once."""

    key: str

    @classmethod
    def of(cls, record: ApiKeyRecord, plaintext: str) -> KeyWithSecret:
        return cls(**{f: getattr(record, f) for f in record.__struct_fields__}, key=plaintext)

    def __repr__(self) -> str:
        return f"KeyWithSecret(id={self.id}, last_four={self.last_four!r})"


class EnvironmentList(Page[EnvironmentRecord], kw_only=True, frozen=True):
    pass


class ApiKeyList(Page[ApiKeyRecord], kw_only=True, frozen=True):
    pass
