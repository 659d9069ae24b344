"""Cutting text to a service's limit. Pure.

Limits are measured in UTF-16 code units, as JavaScript counts them (``"🔥".length == 2``):
for text outside the Basic Multilingual Plane that is more than Python's `len`, so a limit
respected here is respected whichever way a service counts characters. A cut never splits a
character and ends with an ellipsis, so a reader sees that something is missing.
"""

from __future__ import annotations

ELLIPSIS = "…"


def units(text: str) -> int:
    """Length in UTF-16 code units."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def truncate(text: str, limit: int) -> str:
    """`text` if it fits in `limit` units, else its start and an ellipsis, within `limit`."""
    if limit <= 0:
        return ""
    encoded = text.encode("utf-16-le", "surrogatepass")
    if len(encoded) <= 2 * limit:
        return text
    budget = limit - units(ELLIPSIS)
    if budget <= 0:
        return ELLIPSIS[:limit]
    # Decoding drops a surrogate pair cut in half (and any lone surrogate): whole characters.
    head = encoded[:2 * budget].decode("utf-16-le", "ignore")
    return head.rstrip() + ELLIPSIS


def one_line(text: str) -> str:
    """Line breaks and tabs folded to spaces (headers, subjects)."""
    return " ".join(text.split())
