"""A page of a list the APIs answer with: its rows and where the next page starts."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

T = TypeVar("T")


class Page(msgspec.Struct, Generic[T], kw_only=True, frozen=True):
    """Subclassed per row type (`class TenantList(Page[TenantRecord])`), so the OpenAPI
    document names each list as before."""

    data: list[T]
    next_cursor: str | None = None
    """Pass as `cursor` for the next page; null on the last one."""
