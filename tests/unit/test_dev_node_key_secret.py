"""`crosslogic dev` keeps NODE_API_KEY_SECRET in its state folder: made once, private, the
same for the gateway and the orchestrator on every run."""

from __future__ import annotations

import stat
from pathlib import Path

from services.cli.dev_processes import NODE_KEY_SECRET_FILE, node_key_secret
from services.infra.node_keys import check_secret


def test_made_once_kept_private_and_reused(tmp_path: Path) -> None:
    first = node_key_secret(tmp_path)
    check_secret(first)  # strong enough for the services that refuse weak ones
    path = tmp_path / NODE_KEY_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert node_key_secret(tmp_path) == first
    path.write_text("")  # an emptied file is made again, not used empty
    assert node_key_secret(tmp_path) not in ("", first)
