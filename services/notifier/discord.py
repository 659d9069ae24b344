"""Discord webhook messages, always within Discord's limits (a message over one is a 400 and
is lost). Pure.

Limits (https://discord.com/developers/docs/resources/message#embed-object-embed-limits):
`content` 2,000 characters; 10 embeds; per embed a title of 256, a description of 4,096,
25 fields of name 256 and value 1,024, a footer of 2,048, an author name of 256; and 6,000
characters across all the embeds' titles, descriptions, field names and values, footers and
author names. `fit` enforces them on any payload: it cuts text (with an ellipsis), drops
fields and embeds past the counts and the total, and says in `content` what was left out.
"""

from __future__ import annotations

import re
from datetime import UTC
from typing import Any

from services.notifier.messages import Message, Section, Severity
from services.notifier.text import truncate, units

CONTENT = 2000
EMBEDS = 10
TITLE = 256
DESCRIPTION = 4096
FIELDS = 25
FIELD_NAME = 256
FIELD_VALUE = 1024
FOOTER = 2048
AUTHOR = 256
TOTAL = 6000
URL = 2048
MIN_EMBED = 40
"""An embed that would get fewer characters than this is dropped instead."""

COLORS = {Severity.CRITICAL: 0xE01E5A, Severity.WARNING: 0xF2A93B, Severity.INFO: 0x3B82F6,
          Severity.RESOLVED: 0x2EB67D}
_HTTP_URL = re.compile(r"^https?://\S+$")


def _embed(section: Section) -> dict[str, Any]:
    embed: dict[str, Any] = {"title": section.title, "color": COLORS[section.severity]}
    if section.text:
        embed["description"] = section.text
    if section.fields:
        embed["fields"] = [{"name": f.name, "value": f.value, "inline": f.inline}
                           for f in section.fields]
    if section.url:
        embed["url"] = section.url
    if section.timestamp is not None:
        embed["timestamp"] = section.timestamp.astimezone(UTC).isoformat()
    return embed


def payload(message: Message) -> dict[str, Any]:
    embeds = [_embed(s) for s in message.sections]
    if embeds and message.footer:
        embeds[-1]["footer"] = {"text": message.footer}
    raw = {"content": message.headline, "embeds": embeds,
           # A payload must never ping @everyone, whatever text an event carries.
           "allowed_mentions": {"parse": []}}
    return fit(raw, omitted=message.omitted)


def _nonblank(text: Any) -> str:
    value = str(text) if text is not None else ""
    return value if value.strip() else "-"


def _shrink(embed: dict[str, Any], budget: int) -> tuple[dict[str, Any] | None, int]:
    """The embed cut to its own limits and to `budget` characters of the total; None when it
    does not fit usefully. Returns the characters it uses."""
    if budget < MIN_EMBED:
        return None, 0
    out: dict[str, Any] = {}
    color = embed.get("color")
    if isinstance(color, int) and 0 <= color <= 0xFFFFFF:
        out["color"] = color
    url = embed.get("url")
    if isinstance(url, str) and len(url) <= URL and _HTTP_URL.match(url):
        out["url"] = url
    if isinstance(embed.get("timestamp"), str):
        out["timestamp"] = embed["timestamp"]
    used = 0

    def take(text: Any, limit: int) -> str:
        nonlocal used
        cut = truncate(str(text), min(limit, budget - used))
        used += units(cut)
        return cut

    if embed.get("title"):
        title = take(embed["title"], TITLE)
        if title:
            out["title"] = title
    if isinstance(embed.get("author"), dict) and embed["author"].get("name"):
        author = take(embed["author"]["name"], AUTHOR)
        if author:
            out["author"] = {"name": author}
    if embed.get("description"):
        description = take(embed["description"], DESCRIPTION)
        if description:
            out["description"] = description
    fields = []
    for f in (embed.get("fields") or [])[:FIELDS]:
        name, value = _nonblank(f.get("name")), _nonblank(f.get("value"))
        room = budget - used
        if room < 2 + min(units(name), 8):
            break
        cut_name = truncate(name, min(FIELD_NAME, room - 1))
        cut_value = truncate(value, min(FIELD_VALUE, room - units(cut_name)))
        if not cut_name or not cut_value:
            break
        used += units(cut_name) + units(cut_value)
        fields.append({"name": cut_name, "value": cut_value, "inline": bool(f.get("inline"))})
    if fields:
        out["fields"] = fields
    footer = embed.get("footer")
    if isinstance(footer, dict) and footer.get("text") and budget - used > 0:
        text = take(footer["text"], FOOTER)
        if text:
            out["footer"] = {"text": text}
    if not any(k in out for k in ("title", "description", "fields")):
        return None, 0
    return out, used


def embed_chars(embed: dict[str, Any]) -> int:
    """What counts towards the 6,000 total."""
    total = units(str(embed.get("title", ""))) + units(str(embed.get("description", "")))
    for f in embed.get("fields") or []:
        total += units(str(f.get("name", ""))) + units(str(f.get("value", "")))
    total += units(str((embed.get("footer") or {}).get("text", "")))
    total += units(str((embed.get("author") or {}).get("name", "")))
    return total


def fit(raw: dict[str, Any], *, omitted: int = 0) -> dict[str, Any]:
    """`raw` within every limit. Embeds are kept in order, whole while they fit; the one
    that crosses the total is cut, the rest dropped and counted in `content`."""
    embeds_in = [e for e in raw.get("embeds") or [] if isinstance(e, dict)]
    embeds: list[dict[str, Any]] = []
    budget = TOTAL
    for embed in embeds_in[:EMBEDS]:
        shrunk, used = _shrink(embed, budget)
        if shrunk is None:
            break
        embeds.append(shrunk)
        budget -= used
    left_out = len(embeds_in) - len(embeds) + omitted
    content = str(raw.get("content") or "")
    note = f" (+{left_out} more not shown)" if left_out else ""
    out = {k: v for k, v in raw.items() if k not in ("content", "embeds")}
    out["content"] = truncate(content, CONTENT - units(note)) + note
    out["embeds"] = embeds
    if "username" in out:
        out["username"] = truncate(str(out["username"]), 80)
    return out


def check(payload_: dict[str, Any]) -> list[str]:
    """Every limit `payload_` breaks (empty: Discord accepts it). The test receiver answers
    400 with these, as Discord would."""
    problems = []
    if units(str(payload_.get("content", ""))) > CONTENT:
        problems.append("content over 2000")
    embeds = payload_.get("embeds") or []
    if len(embeds) > EMBEDS:
        problems.append("more than 10 embeds")
    total = 0
    for i, e in enumerate(embeds):
        total += embed_chars(e)
        for key, limit in (("title", TITLE), ("description", DESCRIPTION)):
            if units(str(e.get(key, ""))) > limit:
                problems.append(f"embeds[{i}].{key} over {limit}")
        fields = e.get("fields") or []
        if len(fields) > FIELDS:
            problems.append(f"embeds[{i}] has more than 25 fields")
        for j, f in enumerate(fields):
            name, value = str(f.get("name", "")), str(f.get("value", ""))
            if not name.strip() or units(name) > FIELD_NAME:
                problems.append(f"embeds[{i}].fields[{j}].name empty or over 256")
            if not value.strip() or units(value) > FIELD_VALUE:
                problems.append(f"embeds[{i}].fields[{j}].value empty or over 1024")
        if units(str((e.get("footer") or {}).get("text", ""))) > FOOTER:
            problems.append(f"embeds[{i}].footer.text over 2048")
    if total > TOTAL:
        problems.append(f"embeds total {total} over 6000")
    if not payload_.get("content") and not embeds:
        problems.append("empty message")
    return problems
