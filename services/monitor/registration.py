"""What the monitor accepts as a node registration. Pure."""

from __future__ import annotations

import urllib.parse

from schemas.events import NodeRegistered


def check_registration(event: NodeRegistered) -> None:
    """ValueError (the message goes to the dead letters) for a registration nobody can route
    to: no model, no usable address."""
    if not event.model_name.strip():
        raise ValueError("registration without a model_name")
    url = urllib.parse.urlsplit(event.endpoint_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"registration with an unusable endpoint_url {event.endpoint_url!r}")
    if event.vram_total_gb < 0:
        raise ValueError("registration with a negative vram_total_gb")
