"""R2 for the orchestrator: the reference's R2_* settings as SkyPilot's credential files, the
refusals at start, and the SkyPilot launcher's refusal of a file:// source."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

import pytest

from services.domain.catalog.weights import FileWeights
from services.infra.settings import Secret, load_settings
from services.orchestrator.app import LauncherError, r2_files
from services.orchestrator.launcher import LaunchError, LaunchSpec
from services.orchestrator.r2_credentials import (
    ACCOUNT_ID_FILE,
    CREDENTIALS_FILE,
    R2SettingsError,
    r2_credential_files,
    write_r2_credentials,
)
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.skypilot_launcher import SkyPilotLauncher
from services.orchestrator.skypilot_task import TaskOptions

ACCOUNT = "0123456789abcdef0123456789ABCDEF"
KEY_ID = "a3f1c0ffee0123456789abcdef012345"
SECRET = "9b1d2e3f" * 8


def test_the_three_settings_make_skypilots_two_files() -> None:
    files = r2_credential_files(ACCOUNT, KEY_ID, SECRET)
    assert files == {
        ".cloudflare/r2.credentials": (f"[r2]\naws_access_key_id = {KEY_ID}\n"
                                       f"aws_secret_access_key = {SECRET}\n"),
        ".cloudflare/accountid": ACCOUNT.lower() + "\n",
    }


def test_the_file_names_are_skypilots() -> None:
    from sky.adaptors import cloudflare

    assert f"~/{CREDENTIALS_FILE}" == cloudflare.R2_CREDENTIALS_PATH
    assert f"~/{ACCOUNT_ID_FILE}" == cloudflare.ACCOUNT_ID_PATH
    assert cloudflare.R2_PROFILE_NAME == "r2"


def test_none_set_writes_nothing() -> None:
    assert r2_credential_files("", "", "") is None


@pytest.mark.parametrize(("account", "key_id", "secret", "complaint"), [
    (ACCOUNT, KEY_ID, "", "R2_SECRET_ACCESS_KEY not set"),
    ("", KEY_ID, SECRET, "R2_ACCOUNT_ID not set"),
    (ACCOUNT, "", "", "R2_ACCESS_KEY_ID, R2_SECRET_ACCESS_KEY not set"),
    ("my-account", KEY_ID, SECRET, "not a Cloudflare account id"),
    (ACCOUNT + "\n", KEY_ID, SECRET, "not a Cloudflare account id"),
    (ACCOUNT, KEY_ID + "\n[default]", SECRET, "R2_ACCESS_KEY_ID must be printable"),
    (ACCOUNT, KEY_ID, "with space", "R2_SECRET_ACCESS_KEY must be printable"),
    (ACCOUNT, KEY_ID, "[r2]", "R2_SECRET_ACCESS_KEY must be printable"),
])
def test_half_or_malformed_is_refused(account: str, key_id: str, secret: str,
                                      complaint: str) -> None:
    with pytest.raises(R2SettingsError, match=complaint) as err:
        r2_credential_files(account, key_id, secret)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)


def test_files_are_written_for_the_owner_only(tmp_path: Path) -> None:
    stale = tmp_path / CREDENTIALS_FILE
    stale.parent.mkdir()
    stale.write_text("[r2]\naws_access_key_id = old\n")
    files = r2_credential_files(ACCOUNT, KEY_ID, SECRET)
    assert files is not None
    write_r2_credentials(tmp_path, files)
    for relative, content in files.items():
        path = tmp_path / relative
        assert path.read_text() == content
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in stale.parent.iterdir() if p.name.startswith(".")] == []


def test_settings_read_the_reference_names_and_hide_the_secrets() -> None:
    s = load_settings(OrchestratorSettings, {
        "LAUNCHER": "skypilot", "R2_ACCOUNT_ID": ACCOUNT, "R2_ACCESS_KEY_ID": KEY_ID,
        "R2_SECRET_ACCESS_KEY": SECRET})
    assert s.r2_access_key_id == Secret(KEY_ID)
    assert SECRET not in repr(s) and KEY_ID not in repr(s)
    assert r2_files(s) == r2_credential_files(ACCOUNT, KEY_ID, SECRET)


def test_half_an_r2_configuration_fails_at_start() -> None:
    s = OrchestratorSettings(launcher="skypilot", r2_account_id=ACCOUNT,
                             r2_access_key_id=Secret(KEY_ID))
    with pytest.raises(LauncherError, match="R2_SECRET_ACCESS_KEY not set"):
        r2_files(s)
    # The local cloud never reaches R2: nothing to write, nothing to refuse.
    assert r2_files(OrchestratorSettings(launcher="local", r2_account_id=ACCOUNT)) is None


async def test_the_skypilot_launcher_refuses_a_path_on_this_host() -> None:
    launcher = SkyPilotLauncher(prefix="crosslogic", options=TaskOptions(), max_concurrent=1)
    spec = LaunchSpec(node_id=uuid.uuid4(), cluster_name="crosslogic-m-1a2b3c4d",
                      model_name="acme/m", provider="aws", region="us-east-1",
                      gpu_type="A10G", spot=False, weights=FileWeights("/srv/models/m"))
    try:
        with pytest.raises(LaunchError, match="only the local cloud") as err:
            await launcher.launch(spec)
        assert not err.value.capacity  # not the cloud's room: the deployment backs off
    finally:
        await launcher.close()
