"""E-mail notifications: a plain-text part and an HTML part of the same message. Pure.

Everything from events is escaped in the HTML. The Message-ID is made from the event and the
subscription, so a mail client threads or deduplicates a retried message.
"""

from __future__ import annotations

import html
import uuid
from email.message import EmailMessage
from email.utils import format_datetime

from services.notifier.messages import Message, Severity
from services.notifier.text import one_line, truncate

SUBJECT = 200
COLORS = {Severity.CRITICAL: "#e01e5a", Severity.WARNING: "#f2a93b", Severity.INFO: "#3b82f6",
          Severity.RESOLVED: "#2eb67d"}


def subject(message: Message) -> str:
    return truncate(one_line(f"[CrossLogic] {message.headline}"), SUBJECT)


def plain_text(message: Message) -> str:
    lines: list[str] = [message.headline, ""]
    for section in message.sections:
        lines.append(f"{section.title} ({section.severity.value})")
        if section.text:
            lines.append(section.text)
        lines.extend(f"  {f.name}: {f.value}" for f in section.fields)
        if section.url:
            lines.append(f"  {section.url}")
        lines.append("")
    if message.omitted:
        lines.append(f"…and {message.omitted} more not shown.")
    if message.footer:
        lines.append(f"-- {message.footer}")
    return "\n".join(lines).rstrip() + "\n"


def html_body(message: Message) -> str:
    e = html.escape
    parts = [f"<h2>{e(message.headline)}</h2>"]
    for section in message.sections:
        color = COLORS[section.severity]
        title = e(section.title)
        if section.url.startswith(("http://", "https://")):
            title = f'<a href="{e(section.url, quote=True)}">{title}</a>'
        parts.append(f'<div style="border-left:4px solid {color};padding-left:8px;'
                     f'margin-bottom:12px"><h3>{title}</h3>')
        if section.text:
            parts.append(f"<p>{e(section.text).replace(chr(10), '<br>')}</p>")
        if section.fields:
            rows = "".join(f"<tr><th align=\"left\">{e(f.name)}</th><td>{e(f.value)}</td></tr>"
                           for f in section.fields)
            parts.append(f"<table>{rows}</table>")
        parts.append("</div>")
    if message.omitted:
        parts.append(f"<p>…and {message.omitted} more not shown.</p>")
    if message.footer:
        parts.append(f'<p style="color:#888">{e(message.footer)}</p>')
    return "<!doctype html><html><body>" + "".join(parts) + "</body></html>\n"


def build(message: Message, *, sender: str, recipient: str,
          subscription_id: uuid.UUID) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = subject(message)
    mail["From"] = sender
    mail["To"] = recipient
    if message.occurred_at is not None:
        mail["Date"] = format_datetime(message.occurred_at)
    mail["Message-ID"] = f"<{message.event_id}.{subscription_id}@notifier.crosslogic>"
    mail["X-CrossLogic-Event-Type"] = message.event_type
    mail.set_content(plain_text(message))
    mail.add_alternative(html_body(message), subtype="html")
    return mail
