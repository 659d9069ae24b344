"""The reference's R2_ACCOUNT_ID, R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY, as the files
SkyPilot reads its Cloudflare R2 credentials from: `~/.cloudflare/r2.credentials` (an AWS-style
credentials file with an `[r2]` profile) and `~/.cloudflare/accountid`.

SkyPilot needs them wherever `sky.launch` runs (this orchestrator, or the SkyPilot API server
it talks to) to copy a model's r2:// weights onto its nodes, and it copies them to the nodes
too: give it an R2 token that can only read the models' bucket (docs/orchestrator.md).

`r2_credential_files` is pure (what to write, or why the settings are wrong);
`write_r2_credentials` writes them.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["ACCOUNT_ID_FILE", "CREDENTIALS_FILE", "R2SettingsError", "r2_credential_files",
           "write_r2_credentials"]

CREDENTIALS_FILE = ".cloudflare/r2.credentials"
ACCOUNT_ID_FILE = ".cloudflare/accountid"
"""Relative to the home directory, as SkyPilot's sky/adaptors/cloudflare.py names them."""

_ACCOUNT_ID = re.compile(r"^[0-9a-fA-F]{32}$")
# One line of an INI file: a newline or a bracket would let a value write another profile.
_KEY = re.compile(r"^[!-~]{1,256}$")


class R2SettingsError(ValueError):
    """The R2_* settings cannot make SkyPilot's credentials; never carries a secret."""


def r2_credential_files(account_id: str, access_key_id: str,
                        secret_access_key: str) -> dict[str, str] | None:
    """Relative path → content; None when none of the three is set (SkyPilot then uses
    whatever files the machine already has). Raises R2SettingsError when only some are set
    or one is malformed."""
    given = {"R2_ACCOUNT_ID": account_id, "R2_ACCESS_KEY_ID": access_key_id,
             "R2_SECRET_ACCESS_KEY": secret_access_key}
    missing = [name for name, value in given.items() if not value]
    if len(missing) == len(given):
        return None
    if missing:
        raise R2SettingsError(f"{', '.join(missing)} not set: R2 needs all of R2_ACCOUNT_ID, "
                              "R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY, or none")
    if not _ACCOUNT_ID.fullmatch(account_id):
        raise R2SettingsError("R2_ACCOUNT_ID is not a Cloudflare account id (32 hexadecimal "
                              "digits)")
    for name in ("R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
        if not _KEY.fullmatch(given[name]) or "[" in given[name]:
            raise R2SettingsError(f"{name} must be printable ASCII without spaces or '['")
    return {
        CREDENTIALS_FILE: (f"[r2]\naws_access_key_id = {access_key_id}\n"
                           f"aws_secret_access_key = {secret_access_key}\n"),
        ACCOUNT_ID_FILE: f"{account_id.lower()}\n",
    }


def write_r2_credentials(home: Path, files: dict[str, str]) -> None:
    """Each file under `home`, readable by its owner only, replaced whole (a reader never
    sees half a file). Raises OSError."""
    for relative, content in files.items():
        path = home / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: already 0600
                f.write(content)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
