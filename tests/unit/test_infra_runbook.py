"""docs/TROUBLESHOOTING_RUNBOOK.md and the alert rules stay in step: every alert has its
section, every runbook_url lands on a heading, and the `crosslogic` commands the runbook tells an
operator to type exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from services.cli.main import build_parser
from tests.unit.test_alerts import alert_rules
from tests.unit.test_infra_metric_names import ROOT

RUNBOOK = ROOT / "docs" / "TROUBLESHOOTING_RUNBOOK.md"


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def sections(path: Path = RUNBOOK) -> dict[str, str]:
    """{anchor: body} for every `## ` heading."""
    parts = re.split(r"^## (.+)$", path.read_text(), flags=re.MULTILINE)
    return {anchor(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)}


def test_anchor() -> None:
    assert anchor("HighErrorRate") == "higherrorrate"
    assert anchor("Restoring from a backup") == "restoring-from-a-backup"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_runbook_section(rule: dict[str, Any]) -> None:
    found = sections()
    url = str(rule["annotations"]["runbook_url"])
    path, _, fragment = url.partition("#")
    assert (ROOT / path).resolve() == RUNBOOK.resolve()
    assert fragment in found, f"no heading for #{fragment}"
    body = found[fragment]
    for part in ("**Means.**", "**Check.**", "**Recover.**"):
        assert part in body, f"{rule['alert']}: {part} missing"


def test_no_runbook_section_for_an_alert_that_is_gone() -> None:
    alerts = {str(rule["alert"]).lower() for rule in alert_rules()}
    # Sections that are not alerts are plain-language headings (with spaces).
    headings = re.findall(r"^## (\S+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    assert {h.lower() for h in headings} <= alerts


def test_links_inside_the_runbook_land() -> None:
    found = sections()
    for target in re.findall(r"\]\(#([\w-]+)\)", RUNBOOK.read_text()):
        assert target in found, target
    for doc, fragment in re.findall(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)", RUNBOOK.read_text()):
        path = RUNBOOK.parent / doc
        assert path.exists(), doc
        assert not fragment or fragment in anchors(path), f"{doc}#{fragment}"


# Placeholders for numbers: what argparse's type=int needs to see.
PLACEHOLDERS = {"N": "2", "POSITION": "1200"}


def _commands() -> list[str]:
    """Every `crosslogic …` command quoted in backticks, placeholders and all."""
    text = RUNBOOK.read_text()
    found = {m.strip() for m in re.findall(r"`(crosslogic [^`]+)`", text)}
    return sorted(c for c in found if c.replace("…", "").strip() != "crosslogic")


@pytest.mark.parametrize("command", _commands())
def test_runbook_commands_parse(command: str) -> None:
    """The CLI accepts each command as written (placeholders stand for their values)."""
    command = command.split(" | ")[0].replace("…", "")
    argv = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"`{command}` does not parse: exit {exc.code}")
    assert callable(args.func)


def test_links_from_the_infra_files_to_the_docs_land() -> None:
    """The manifests and the compose file send operators to docs/<page>.md#<section>."""
    files = [p for p in (ROOT / "infra").rglob("*") if p.is_file()
             and p.suffix in (".yml", ".yaml", ".sh", ".example", ".json")]
    links = {(m.group(1), m.group(2)) for path in [*files, ROOT / "Dockerfile"]
             for m in re.finditer(r"docs/([\w.-]+\.md)#([\w-]+)", path.read_text())}
    assert ("operations.md", "gpu-nodes-reach-nats-over-tls") in links
    for page, fragment in links:
        assert fragment in anchors(ROOT / "docs" / page), f"docs/{page}#{fragment}"
