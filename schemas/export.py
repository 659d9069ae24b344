"""Export the JSON Schema of every event to schemas/jsonschema/ and the catalog to
docs/events.md (both checked in).

`python -m schemas.export` rewrites the files; `python -m schemas.export --check` exits 1 when
they are stale (the test suite does the same).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from schemas.events import ENVELOPE_FIELDS, EVENT_TYPES, AnyEvent
from schemas.schema_components import schema_components
from schemas.subjects import stream_for_subject

OUT_DIR = Path(__file__).parent / "jsonschema"
CATALOG = Path(__file__).parent.parent / "docs" / "events.md"


def render() -> dict[str, str]:
    """File name → content, for everything under schemas/jsonschema/."""
    (union,), components = schema_components([AnyEvent], ref_template="#/$defs/{name}")
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://crosslogic.ai/schemas/events.json",
        "title": "CrossLogic events",
        "description": "Any event of the platform, tagged by `type`. "
                       "Generated from schemas/events.py: do not edit.",
        **union,
        "$defs": components,
    }
    files = {"events.json": _dump(document)}
    index = {t: f"events.json#/$defs/{cls.__name__}" for t, cls in sorted(EVENT_TYPES.items())}
    files["index.json"] = _dump(index)
    return files


def _type_name(tp: object) -> str:
    text = getattr(tp, "__name__", None) if not hasattr(tp, "__args__") else None
    text = text or str(tp)
    for noise in ("typing.", "uuid.", "datetime.", "decimal.", "schemas.events.", "<class '",
                  "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None")


def render_catalog() -> str:
    """docs/events.md: every event type with its subject, stream and fields."""
    lines = [
        "# Events catalog",
        "",
        "Generated from `schemas/events.py` by `make schemas`; a test fails when it is stale.",
        "Every event also carries the envelope: `id` (UUIDv7), `type`, `stream`, `occurred_at`",
        "and `metadata` (`correlation_id`, `causation_id`, `actor`). Subjects are",
        "`<type>.<token>`; `platform` is the token of events that belong to no tenant.",
        "",
        "| Type | Subject | JetStream stream | Log stream |",
        "|------|---------|------------------|------------|",
    ]
    for event_type, cls in sorted(EVENT_TYPES.items()):
        token = cls.subject_field or cls.stream_field
        subject = f"{event_type}.<{token}>"
        spec = stream_for_subject(f"{event_type}.x")
        lines.append(f"| `{event_type}` | `{subject}` | {spec.name if spec else '-'} | "
                     f"`{cls.aggregate}:<{cls.stream_field}>` |")
    for event_type, cls in sorted(EVENT_TYPES.items()):
        lines += ["", f"## `{event_type}`", ""]
        doc = (cls.__doc__ or "").strip()
        if doc:
            lines += [" ".join(doc.split()), ""]
        lines += ["| Field | Type | Required |", "|-------|------|----------|"]
        for f in msgspec.structs.fields(cls):
            if f.name in ENVELOPE_FIELDS:
                continue
            lines.append(f"| `{f.name}` | `{_type_name(f.type)}` | "
                         f"{'yes' if f.required else 'no'} |")
    return "\n".join(lines) + "\n"


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def stale() -> list[str]:
    """Files whose content differs from what `render` gives (or that should not be there)."""
    want = render()
    have = {p.name: p.read_text() for p in OUT_DIR.glob("*.json")}
    bad = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
    if not CATALOG.exists() or CATALOG.read_text() != render_catalog():
        bad.append("docs/events.md")
    return bad


def write() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    want = render()
    for path in OUT_DIR.glob("*.json"):
        if path.name not in want:
            path.unlink()
    for name, content in want.items():
        (OUT_DIR / name).write_text(content)
    CATALOG.parent.mkdir(exist_ok=True)
    CATALOG.write_text(render_catalog())


if __name__ == "__main__":
    if "--check" in sys.argv:
        bad = stale()
        if bad:
            print(f"stale: {', '.join(bad)}; run `make schemas`", file=sys.stderr)
            sys.exit(1)
    else:
        write()
