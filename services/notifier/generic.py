"""Generic webhooks, signed per Standard Webhooks (https://www.standardwebhooks.com/). Pure.

The body is ``{"type", "timestamp", "data"}`` with the whole event (sensitive fields removed)
as `data`. Headers: `webhook-id` (the event id: the same on every retry and replay, so a
receiver can drop a repeat), `webhook-timestamp` (seconds, when this attempt was signed) and
`webhook-signature` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), made with the
`standardwebhooks` library from the endpoint's ``whsec_`` secret. A receiver verifies with the
same library: ``Webhook(secret).verify(body, headers)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from standardwebhooks import Webhook

USER_AGENT = "CrossLogic-Notifier/1.0"


def body(event: Mapping[str, Any]) -> bytes:
    return msgspec.json.encode({"type": event.get("type"),
                                "timestamp": event.get("occurred_at"),
                                "data": event})


def headers(secret: str, message_id: str, payload: bytes, now: datetime) -> dict[str, str]:
    now = now.astimezone(UTC)
    signature = Webhook(secret).sign(message_id, now, payload.decode())
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": signature}
