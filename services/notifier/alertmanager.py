"""The Alertmanager bridge: Prometheus Alertmanager's webhook payload (version 4) in, one
`notification.alert` event out, fanned out to the platform's subscriptions.

Point a receiver at it::

    receivers:
      - name: crosslogic
        webhook_configs:
          - url: http://notifier:8084/alertmanager
            http_config: {authorization: {credentials: <ALERTMANAGER_TOKEN>}}

Alerts are platform events (no tenant), so only platform subscriptions whose patterns match
``notification.alert`` hear them, e.g. ``notification.alert`` or ``notification.*``.

The token is required unless the notifier listens on loopback only (settings.check_intake):
anyone who could POST here would otherwise page every platform subscriber.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated

import msgspec

from schemas.events import AlertItem, NotificationAlert

MAX_ALERTS = 1000


class AmAlert(msgspec.Struct, kw_only=True, frozen=True):
    status: str
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    starts_at: datetime | None = msgspec.field(default=None, name="startsAt")
    ends_at: datetime | None = msgspec.field(default=None, name="endsAt")
    generator_url: str = msgspec.field(default="", name="generatorURL")
    fingerprint: str = ""


class AmPayload(msgspec.Struct, kw_only=True, frozen=True):
    """https://prometheus.io/docs/alerting/latest/configuration/#webhook_config"""

    version: str
    status: str
    alerts: Annotated[list[AmAlert], msgspec.Meta(max_length=MAX_ALERTS)]
    group_key: str = msgspec.field(default="", name="groupKey")
    truncated_alerts: int = msgspec.field(default=0, name="truncatedAlerts")
    receiver: str = ""
    group_labels: dict[str, str] = msgspec.field(default_factory=dict, name="groupLabels")
    common_labels: dict[str, str] = msgspec.field(default_factory=dict, name="commonLabels")
    common_annotations: dict[str, str] = msgspec.field(default_factory=dict,
                                                       name="commonAnnotations")
    external_url: str = msgspec.field(default="", name="externalURL")


def _time(value: datetime | None) -> datetime | None:
    # Alertmanager sends the zero time (year 1) for "not ended yet".
    return None if value is None or value.year <= 1 else value


def parse(body: bytes) -> AmPayload:
    """ValueError saying what is wrong with the payload."""
    try:
        payload = msgspec.json.decode(body, type=AmPayload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"not an Alertmanager webhook payload: {exc}") from None
    if payload.version != "4":
        raise ValueError(f"webhook payload version {payload.version!r} is not supported "
                         "(version 4 is)")
    if payload.status not in ("firing", "resolved"):
        raise ValueError(f"status must be firing or resolved, not {payload.status!r}")
    return payload


def to_event(payload: AmPayload) -> NotificationAlert:
    key = payload.group_key or payload.receiver
    group_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    alerts = [AlertItem(status=a.status, labels=a.labels, annotations=a.annotations,
                        starts_at=_time(a.starts_at), ends_at=_time(a.ends_at),
                        generator_url=a.generator_url, fingerprint=a.fingerprint)
              for a in payload.alerts]
    return NotificationAlert(
        group_id=group_id, status=payload.status, receiver=payload.receiver,
        group_key=payload.group_key, group_labels=payload.group_labels,
        common_labels=payload.common_labels, common_annotations=payload.common_annotations,
        external_url=payload.external_url, truncated_alerts=payload.truncated_alerts,
        alerts=alerts)
