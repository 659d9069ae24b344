"""What a catalog command raises when it cannot be done as asked."""

from __future__ import annotations


class CatalogError(Exception):
    """A command that cannot be done as asked; the message says why."""


class NotFound(CatalogError):
    pass


class Conflict(CatalogError):
    pass


class Invalid(CatalogError):
    """The request contradicts the current state (e.g. max_nodes below min_nodes after a
    change): `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LimitReached(CatalogError):
    """The tenant has as many of these as it may have (a limit the caller set)."""
