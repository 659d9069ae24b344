"""What a notification says, before any service's format: a headline and sections of fields.
Pure: an event's JSON in, a `Message` out.

Known event types get a sentence an operator can act on ("Node 0193a1b2 is unhealthy");
any other type, including ones added after this build, gets its type as the title and its
payload as fields, so a subscription to a new type still says something useful.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import ENVELOPE_FIELDS


class Severity(enum.StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Field:
    name: str
    value: str
    inline: bool = True


@dataclass(frozen=True)
class Section:
    title: str
    text: str = ""
    fields: tuple[Field, ...] = ()
    severity: Severity = Severity.INFO
    url: str = ""
    timestamp: datetime | None = None


@dataclass(frozen=True)
class Message:
    headline: str
    """One line: Discord's content, Slack's fallback text, the e-mail's subject."""
    sections: tuple[Section, ...]
    event_type: str
    event_id: str
    occurred_at: datetime | None = None
    omitted: int = 0
    """Sections the source already left out (Alertmanager's truncatedAlerts)."""
    footer: str = field(default="")

    @property
    def severity(self) -> Severity:
        order = list(Severity)
        return min((s.severity for s in self.sections), key=order.index,
                   default=Severity.INFO)


# --------------------------------------------------------------------------- helpers


def short(value: Any) -> str:
    """The first 8 characters of an id: enough to tell nodes apart in a chat message."""
    text = str(value or "")
    return text[:8] if len(text) >= 32 else text


def text_of(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(text_of(v) for v in value) or "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={text_of(v)}" for k, v in value.items()) or "-"
    return str(value)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        found = datetime.fromisoformat(value)
    except ValueError:
        return None
    return found if found.tzinfo is not None else None


def payload_fields(payload: Mapping[str, Any], skip: tuple[str, ...] = (),
                   limit: int = 20) -> tuple[Field, ...]:
    out = []
    for name, value in payload.items():
        if name in ENVELOPE_FIELDS or name in skip or value in (None, "", [], {}):
            continue
        out.append(Field(name.replace("_", " "), text_of(value)))
        if len(out) == limit:
            break
    return tuple(out)


_ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg",
                           "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"})


def money(amount: Any, currency: Any) -> str:
    """Stripe amounts are in the currency's smallest unit."""
    code = str(currency or "").lower()
    if not isinstance(amount, int):
        return f"{amount} {code.upper()}".strip()
    if code in _ZERO_DECIMAL:
        return f"{amount} {code.upper()}"
    return f"{amount / 100:,.2f} {code.upper()}".strip()


# --------------------------------------------------------------------------- per event type

Describer = Callable[[Mapping[str, Any]], tuple[str, Section]]
"""payload → (headline, section)."""

_NODE_SEVERITY = {"unhealthy": Severity.WARNING, "stale": Severity.CRITICAL,
                  "failed": Severity.CRITICAL, "active": Severity.RESOLVED,
                  "draining": Severity.INFO, "terminated": Severity.INFO}


def _node_status_changed(p: Mapping[str, Any]) -> tuple[str, Section]:
    node, to = short(p.get("node_id")), str(p.get("to_status", "?"))
    title = f"Node {node} is {to}"
    text = f"{p.get('from_status') or 'new'} → {to}"
    if p.get("reason"):
        text += f": {p['reason']}"
    fields = [Field("node", str(p.get("node_id", "-")), inline=False)]
    if p.get("health_score") is not None:
        fields.append(Field("health score", str(p["health_score"])))
    return title, Section(title, text, tuple(fields), _NODE_SEVERITY.get(to, Severity.INFO))


def _node_spot_warning(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = f"Spot instance reclaim notice for node {short(p.get('node_id'))}"
    text = "The cloud will reclaim this spot instance: it is drained and replaced."
    fields = (Field("node", str(p.get("node_id", "-")), inline=False),
              Field("provider", text_of(p.get("provider"))),
              Field("action", text_of(p.get("action"))),
              Field("deadline", text_of(p.get("deadline"))))
    return title, Section(title, text, fields, Severity.WARNING)


def _node_replaced(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = (f"Node {short(p.get('node_id'))} replaced by "
             f"{short(p.get('replacement_id'))}")
    fields = (Field("node", str(p.get("node_id", "-")), inline=False),
              Field("replacement", str(p.get("replacement_id", "-")), inline=False),
              Field("deployment", text_of(p.get("deployment_id")), inline=False))
    return title, Section(title, str(p.get("reason", "")), fields, Severity.WARNING)


def _simple_node(verb: str, severity: Severity) -> Describer:
    def describe(p: Mapping[str, Any]) -> tuple[str, Section]:
        title = f"Node {short(p.get('node_id'))} {verb}"
        return title, Section(title, str(p.get("reason", "")),
                              payload_fields(p, skip=("reason",)), severity)

    return describe


def _no_active_nodes(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = f"No active nodes for {p.get('model_name', 'a deployment')}"
    text = "Requests for this model cannot be served until a node is active again."
    fields = (Field("deployment", str(p.get("deployment_id", "-")), inline=False),
              Field("since", text_of(p.get("since"))))
    return title, Section(title, text, fields, Severity.CRITICAL)


def _payment_failed(p: Mapping[str, Any]) -> tuple[str, Section]:
    amount = money(p.get("amount_due"), p.get("currency"))
    title = f"Payment failed: {amount}"
    text = ("The customer must authenticate the payment." if p.get("action_required")
            else "Stripe could not collect the invoice.")
    fields = (Field("tenant", str(p.get("tenant_id", "-")), inline=False),
              Field("invoice", text_of(p.get("invoice_id"))), Field("amount due", amount))
    return title, Section(title, text, fields, Severity.CRITICAL)


def _tokens(p: Mapping[str, Any]) -> str:
    """``1,234 input tokens``: a meter export's value in its meter's words."""
    value = p.get("value")
    amount = f"{value:,}" if isinstance(value, int) else text_of(value)
    return f"{amount} {str(p.get('meter') or 'tokens').replace('_', ' ')}"


def _export_fields(p: Mapping[str, Any], *extra: Field) -> tuple[Field, ...]:
    return (Field("tenant", str(p.get("tenant_id", "-")), inline=False),
            Field("identifier", str(p.get("identifier", "-")), inline=False),
            Field("hour", text_of(p.get("hour"))), Field("tokens", _tokens(p)), *extra)


def _export_held(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = f"Stripe meter event held for an operator: {_tokens(p)}"
    text = ("The billing pusher will not send it again: an earlier attempt may have reached "
            "Stripe too long ago for a resend to be safe. Look the identifier up in Stripe, "
            f"then settle it: `crosslogic billing settle {p.get('tenant_id', 'TENANT_ID')} "
            f"{p.get('identifier', 'IDENTIFIER')} --exported` if Stripe has it, `--resend` if "
            "it does not.")
    if p.get("reason"):
        text += f"\nWhy: {p['reason']}"
    return title, Section(title, text, _export_fields(
        p, Field("planned at", text_of(p.get("planned_at")))), Severity.WARNING)


def _export_failed(p: Mapping[str, Any]) -> tuple[str, Section]:
    error = str(p.get("error") or "no error given")
    if p.get("retryable"):
        title = f"Stripe meter event not sent yet, retrying: {_tokens(p)}"
        text = f"Stripe did not take it ({error}); the billing pusher sends it again."
        if p.get("ambiguous"):
            text += (" Stripe may have counted this attempt: the resend carries the same "
                     "identifier, which Stripe deduplicates.")
        severity = Severity.INFO
    else:
        title = f"Stripe refused a meter event: {_tokens(p)} not billed"
        text = (f"Stripe refused it ({error}) and it is given up: fix the cause (the tenant's "
                "Stripe customer, the meter settings), then bill these tokens by hand.")
        severity = Severity.WARNING
    return title, Section(title, text, _export_fields(p), severity)


def _tenant_suspended(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = "Tenant suspended"
    return title, Section(title, str(p.get("reason", "")),
                          (Field("tenant", str(p.get("tenant_id", "-")), inline=False),),
                          Severity.WARNING)


def _endpoint_disabled(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = "A notification endpoint was disabled"
    fields = (Field("subscription", str(p.get("subscription_id", "-")), inline=False),
              Field("last status", text_of(p.get("last_status_code"))))
    return title, Section(title, str(p.get("reason", "")), fields, Severity.WARNING)


def _delivery_failed(p: Mapping[str, Any]) -> tuple[str, Section]:
    title = f"A notification could not be delivered ({p.get('event_type') or 'event'})"
    fields = (Field("subscription", str(p.get("subscription_id", "-")), inline=False),
              Field("event", str(p.get("event_id", "-")), inline=False),
              Field("attempts", text_of(p.get("attempts"))),
              Field("last status", text_of(p.get("last_status_code"))))
    return title, Section(title, str(p.get("error", "")), fields, Severity.WARNING)


DESCRIBERS: dict[str, Describer] = {
    "node.status_changed": _node_status_changed,
    "node.spot_warning": _node_spot_warning,
    "node.replaced": _node_replaced,
    "node.registered": _simple_node("registered", Severity.INFO),
    "node.draining": _simple_node("is draining", Severity.INFO),
    "node.deregistered": _simple_node("left", Severity.INFO),
    "node.terminated": _simple_node("was terminated", Severity.INFO),
    "deployment.no_active_nodes": _no_active_nodes,
    "billing.payment_failed": _payment_failed,
    "billing.export_held": _export_held,
    "billing.export_failed": _export_failed,
    "tenant.suspended": _tenant_suspended,
    "notification.endpoint_disabled": _endpoint_disabled,
    "notification.delivery_failed": _delivery_failed,
}


def _generic(event_type: str, p: Mapping[str, Any]) -> tuple[str, Section]:
    title = event_type
    return title, Section(title, "", payload_fields(p))


# --------------------------------------------------------------------------- alerts

_ALERT_SEVERITY = {"critical": Severity.CRITICAL, "page": Severity.CRITICAL,
                   "error": Severity.CRITICAL, "warning": Severity.WARNING,
                   "info": Severity.INFO}


def _alert_message(p: Mapping[str, Any], event_type: str, event_id: str) -> Message:
    alerts = [a for a in p.get("alerts") or [] if isinstance(a, Mapping)]
    firing = sum(1 for a in alerts if a.get("status") == "firing")
    group = p.get("group_labels") or {}
    common = p.get("common_labels") or {}
    name = group.get("alertname") or common.get("alertname") or "alerts"
    status = str(p.get("status", "firing"))
    headline = (f"[{status.upper()}:{firing}] {name}" if status == "firing"
                else f"[{status.upper()}] {name}")
    sections = []
    for a in alerts:
        labels = a.get("labels") or {}
        notes = a.get("annotations") or {}
        a_status = str(a.get("status", status))
        title = f"[{a_status.upper()}] {labels.get('alertname', name)}"
        text = "\n".join(str(notes[k]) for k in ("summary", "description") if notes.get(k))
        fields = [Field(k, str(v)) for k, v in labels.items() if k != "alertname"]
        fields.append(Field("started", text_of(a.get("starts_at"))))
        if a_status == "resolved" and a.get("ends_at"):
            fields.append(Field("ended", text_of(a.get("ends_at"))))
        severity = (Severity.RESOLVED if a_status == "resolved"
                    else _ALERT_SEVERITY.get(str(labels.get("severity", "")).lower(),
                                             Severity.WARNING))
        sections.append(Section(title, text, tuple(fields), severity,
                                str(a.get("generator_url") or ""), _time(a.get("starts_at"))))
    truncated = p.get("truncated_alerts")
    return Message(headline, tuple(sections), event_type, event_id,
                   omitted=truncated if isinstance(truncated, int) else 0,
                   footer=f"Alertmanager · {p.get('receiver') or 'webhook'}")


# --------------------------------------------------------------------------- the entry point


def describe(event: Mapping[str, Any]) -> Message:
    """The message for an event in its JSON form (as on NATS)."""
    event_type = str(event.get("type", "event"))
    event_id = str(event.get("id", ""))
    occurred_at = _time(event.get("occurred_at"))
    payload = {k: v for k, v in event.items() if k not in ENVELOPE_FIELDS}
    if event_type == "notification.alert":
        message = _alert_message(payload, event_type, event_id)
        return Message(message.headline, message.sections, event_type, event_id, occurred_at,
                       message.omitted, message.footer)
    describer = DESCRIBERS.get(event_type)
    headline, section = describer(payload) if describer else _generic(event_type, payload)
    section = Section(section.title, section.text, section.fields, section.severity,
                      section.url, occurred_at)
    return Message(headline, (section,), event_type, event_id, occurred_at,
                   footer=f"{event_type} · {event_id}")
