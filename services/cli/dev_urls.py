"""Where a running `crosslogic dev` is: the URLs it writes to its state folder and the
other CLI commands read to find its servers and admin API."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(".state/dev")
URLS_FILE = "urls.json"


@dataclass
class DevURLs:
    """What other CLI commands need to reach a running `crosslogic dev`."""

    database_url: str = ""
    redis_url: str = ""
    nats_url: str = ""
    gateway_url: str = ""
    admin_url: str = ""
    admin_token: str = ""


def read_dev_urls(state_dir: Path = DEFAULT_STATE_DIR) -> DevURLs | None:
    """The URLs of a `crosslogic dev` running from this folder, for the other CLI commands."""
    try:
        raw = json.loads((state_dir / URLS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    return DevURLs(**{name: value for name in DevURLs.__dataclass_fields__
                      if isinstance(value := raw.get(name), str)})


def write_dev_urls(urls_file: Path, dev: DevURLs) -> None:
    partial = urls_file.with_name(urls_file.name + ".partial")
    partial.write_text(json.dumps(asdict(dev), indent=2))
    partial.chmod(0o600)
    partial.replace(urls_file)  # readers never see half a file
