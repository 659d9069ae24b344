"""msgspec's JSON Schema components with descriptions that do not depend on its version.

msgspec copies a Struct's docstring into ``description``; releases differ in whether they
dedent it (0.23 does, earlier ones kept the continuation lines' indentation). The checked-in
exports are compared byte for byte, so every description is passed through
``inspect.cleandoc``, which both forms agree with.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import msgspec


def schema_components(types: Iterable[Any], *, ref_template: str
                      ) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    schemas, components = msgspec.json.schema_components(types, ref_template=ref_template)
    return (tuple(_clean(s) for s in schemas),
            {name: _clean(c) for name, c in components.items()})


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str)
                else _clean(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node
