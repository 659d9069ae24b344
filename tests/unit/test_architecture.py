"""The packages' dependency direction (docs/architecture.md), checked on every import in the
tree (top-level and inside functions alike):

    schemas  <-  services/infra  <-  services/domain  <-  each service
                        ^
                        +-- agent (the node agent: infrastructure only)

- `schemas/` imports nothing of ours: it is the contract.
- `services/infra/` never imports the domain or a service.
- `services/domain/` never imports a service.
- No service imports another (gateway, admin, billing, monitor, notifier, orchestrator, cli).
- The node agent (agent/*.py, what ships to GPU machines) imports only schemas and infra; its
  simulator and local cloud (dev tools) may use the domain, never a service.

And no module over 500 lines but the event catalogue.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "admin", "billing", "monitor", "notifier", "orchestrator", "cli")


def imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def ours(module: str) -> str | None:
    """`schemas`, `infra`, `domain`, a service's name, `agent`, or None (not ours)."""
    parts = module.split(".")
    if parts[0] in ("schemas", "agent"):
        return parts[0]
    if parts[0] == "services" and len(parts) > 1:
        return parts[1]
    return None


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] == "services":
        return rel[1]
    if rel[0] == "agent":
        return "agent-tools" if rel[1] in ("simulator", "local_cloud") else "agent"
    return rel[0]


ALLOWED = {
    "schemas": {"schemas"},
    "infra": {"schemas", "infra"},
    "domain": {"schemas", "infra", "domain"},
    "agent": {"schemas", "infra", "agent"},
    "agent-tools": {"schemas", "infra", "domain", "agent"},
    **{service: {"schemas", "infra", "domain", service} for service in SERVICES},
}


def violations() -> list[str]:
    found = []
    for top in ("schemas", "services", "agent"):
        for path in sorted((ROOT / top).rglob("*.py")):
            layer = layer_of(path)
            for module in imports(path):
                target = ours(module)
                if target is not None and target not in ALLOWED[layer]:
                    found.append(f"{path.relative_to(ROOT)} ({layer}) imports {module}")
    return found


def test_every_import_goes_the_one_way() -> None:
    assert violations() == []


def test_every_package_is_placed() -> None:
    """A new top-level package under services/ must be given its place above."""
    packages = {p.name for p in (ROOT / "services").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == {"infra", "domain", *SERVICES}



MAX_LINES = 500
LONG_BY_NATURE = {"schemas/events.py"}
"""The event catalogue: one struct per event type, read as one list."""


def test_no_module_is_over_500_lines() -> None:
    """A module that long holds more than one thing: split it where its parts meet."""
    long = {str(p.relative_to(ROOT)): n
            for top in ("services", "agent", "schemas") for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long.keys() <= LONG_BY_NATURE, long
