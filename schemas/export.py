"""Export the JSON Schema of every event to schemas/jsonschema/ (checked in).

`python -m schemas.export` rewrites the files; `python -m schemas.export --check` exits 1 when
they are stale (the test suite does the same).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from schemas.events import EVENT_TYPES, AnyEvent

OUT_DIR = Path(__file__).parent / "jsonschema"


def render() -> dict[str, str]:
    """File name → content, for everything under schemas/jsonschema/."""
    (union,), components = msgspec.json.schema_components([AnyEvent],
                                                          ref_template="#/$defs/{name}")
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


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def stale() -> list[str]:
    """Files whose content differs from what `render` gives (or that should not be there)."""
    want = render()
    have = {p.name: p.read_text() for p in OUT_DIR.glob("*.json")}
    return sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))


def write() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    want = render()
    for path in OUT_DIR.glob("*.json"):
        if path.name not in want:
            path.unlink()
    for name, content in want.items():
        (OUT_DIR / name).write_text(content)


if __name__ == "__main__":
    if "--check" in sys.argv:
        bad = stale()
        if bad:
            print(f"stale: {', '.join(bad)}; run `make schemas`", file=sys.stderr)
            sys.exit(1)
    else:
        write()
