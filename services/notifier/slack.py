"""Slack incoming-webhook messages: `text` (the notification's fallback) and Block Kit
`blocks`, within Slack's limits. Pure.

Limits (https://api.slack.com/reference/block-kit/blocks): 50 blocks a message; a header's
plain text 150 characters; a section's text 3,000, its fields 10 of 2,000 each; a context's
elements 10. `text` is kept under 3,000 (Slack cuts messages far longer, and notifications
show the first line). Text is mrkdwn, so ``&``, ``<`` and ``>`` from events are escaped.
"""

from __future__ import annotations

from typing import Any

from services.notifier.messages import Message, Section, Severity
from services.notifier.text import one_line, truncate

BLOCKS = 50
HEADER = 150
SECTION_TEXT = 3000
SECTION_FIELDS = 10
FIELD_TEXT = 2000
CONTEXT_TEXT = 3000
TEXT = 3000

EMOJI = {Severity.CRITICAL: ":red_circle:", Severity.WARNING: ":large_orange_circle:",
         Severity.INFO: ":large_blue_circle:", Severity.RESOLVED: ":large_green_circle:"}


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _title(section: Section) -> str:
    title = escape(section.title)
    url = section.url
    if url.startswith(("http://", "https://")) and not any(c in url for c in "<>| "):
        return f"<{url}|{title}>"
    return title


def _section_blocks(section: Section) -> list[dict[str, Any]]:
    head = f"{EMOJI[section.severity]} *{_title(section)}*"
    body = escape(section.text)
    text = head + ("\n" + body if body else "")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, SECTION_TEXT)}}]
    fields = [{"type": "mrkdwn",
               "text": truncate(f"*{escape(f.name)}*\n{escape(f.value) or '-'}", FIELD_TEXT)}
              for f in section.fields[:SECTION_FIELDS]]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    return blocks


def payload(message: Message) -> dict[str, Any]:
    header = truncate(one_line(message.headline), HEADER) or "Notification"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}}]
    # Room for the footer and a "more not shown" note.
    room = BLOCKS - len(blocks) - 2
    shown = 0
    for section in message.sections:
        more = _section_blocks(section)
        if len(more) > room:
            break
        blocks.extend(more)
        room -= len(more)
        shown += 1
    left_out = len(message.sections) - shown + message.omitted
    if left_out:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"…and {left_out} more not shown"}]})
    if message.footer:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": truncate(escape(message.footer), CONTEXT_TEXT)}]})
    first = message.sections[0] if message.sections else None
    fallback = message.headline if first is None or not first.text \
        else f"{message.headline}: {first.text}"
    return {"text": truncate(escape(fallback), TEXT), "blocks": blocks}


def check(payload_: dict[str, Any]) -> list[str]:
    """Every limit `payload_` breaks; the test receiver answers 400 with these."""
    problems = []
    if not payload_.get("text") and not payload_.get("blocks"):
        problems.append("no_text")
    blocks = payload_.get("blocks") or []
    if len(blocks) > BLOCKS:
        problems.append("more than 50 blocks")
    for i, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "header" and not 0 < len(b["text"]["text"]) <= HEADER:
            problems.append(f"blocks[{i}] header text empty or over 150")
        if kind == "section":
            if "text" in b and not 0 < len(b["text"]["text"]) <= SECTION_TEXT:
                problems.append(f"blocks[{i}] section text empty or over 3000")
            fields = b.get("fields") or []
            if len(fields) > SECTION_FIELDS:
                problems.append(f"blocks[{i}] more than 10 fields")
            if any(not 0 < len(f["text"]) <= FIELD_TEXT for f in fields):
                problems.append(f"blocks[{i}] field text empty or over 2000")
            if "text" not in b and not fields:
                problems.append(f"blocks[{i}] section without text or fields")
        if kind == "context" and len(b.get("elements") or []) > 10:
            problems.append(f"blocks[{i}] more than 10 context elements")
    return problems
