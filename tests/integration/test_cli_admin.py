"""`crosslogic tenants|environments|keys|models|deployments`, run as an operator runs them: real
processes against the admin API served over TCP, with real PostgreSQL and NATS behind it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.infra.natsauth.identities import Role
from tests.conftest import Servers
from tests.integration.test_admin_api import TOKEN, Admin, running_admin

CLI = [sys.executable, "-m", "services.cli"]


@pytest.fixture
async def admin(servers: Servers, database_url: str, nats_url: str,
                redis_url: str) -> AsyncIterator[Admin]:
    async with running_admin(database_url, nats_url, redis_url,
                             creds=servers.creds(Role.ADMIN_API)) as running:
        yield running


class Cli:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    async def run(self, *args: str) -> tuple[int, str, str]:
        # A subprocess, awaited: the admin app serving it runs on this same event loop.
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 0, (args, out, err)
        return out

    async def json(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(await self.ok(*args, "--json"))  # type: ignore[no-any-return]


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CROSSLOGIC_") and k != "ADMIN_API_TOKEN"}
    env["CROSSLOGIC_STATE_DIR"] = str(tmp_path / "no-dev-here")
    return env


@pytest.fixture
def cli(admin: Admin, tmp_path: Path) -> Cli:
    return Cli({**base_env(tmp_path), "CROSSLOGIC_ADMIN_URL": admin.url,
                "CROSSLOGIC_ADMIN_TOKEN": TOKEN})


async def test_tenant_environment_key_round_trip(cli: Cli) -> None:
    tenant = await cli.json("tenants", "create", "Acme", "--email", "ops@acme.test")
    assert tenant["name"] == "Acme" and tenant["status"] == "active"
    env = await cli.json("environments", "create", tenant["id"], "production",
                         "--region", "us-east-1", "--rpm", "600", "--tpd", "1000000")
    assert env["quota"] == {"requests_per_minute": 600, "tokens_per_minute": None,
                            "tokens_per_day": 1_000_000}

    # Human output: the plaintext key printed once, with the warning.
    out = await cli.ok("keys", "create", env["id"], "--name", "ci", "--rpm", "60",
                       "--concurrency", "4", "--expires", "30d")
    keys = [w for w in out.split() if w.startswith("clsk_live_")]
    assert len(keys) == 1 and "only time the key is shown" in out
    plaintext = keys[0]

    listed = await cli.ok("keys", "list", "--tenant", tenant["id"])
    header, row = listed.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "KEY"]
    assert "ci" in row and plaintext[-4:] in row and plaintext not in listed
    as_json = json.loads(await cli.ok("keys", "list", "--environment", env["id"], "--json"))
    assert [k["last_four"] for k in as_json] == [plaintext[-4:]]
    key_id = as_json[0]["id"]
    assert as_json[0]["limits"]["concurrency"] == 4 and as_json[0]["expires_at"]

    revoked = await cli.json("keys", "revoke", key_id, "--reason", "done")
    assert revoked["status"] == "revoked"
    shown = await cli.ok("keys", "get", key_id)
    assert any(line.split() == ["status", "revoked"] for line in shown.splitlines())

    tenants = await cli.ok("tenants", "list")
    assert "Acme" in tenants and "ops@acme.test" in tenants
    suspended = await cli.json("tenants", "suspend", tenant["id"], "--reason", "unpaid")
    assert suspended["status"] == "suspended"
    envs = await cli.ok("environments", "list", tenant["id"])
    assert "production" in envs and "us-east-1" in envs


async def test_models_and_deployments(cli: Cli) -> None:
    model = await cli.json("models", "create", "llama-8b", "--family", "llama", "--vram-gb",
                           "16", "--input-price", "0.15", "--output-price", "0.60",
                           "--context-length", "8192")
    assert model["input_price_per_million"] == "0.15"
    assert model["weights_source"] is None
    assert "llama-8b" in await cli.ok("models", "list")
    moved = await cli.json("models", "update", model["id"], "--weights-source",
                           "r2://crosslogic-models/llama-8b")
    assert moved["weights_source"] == "r2://crosslogic-models/llama-8b"
    code, _, err = await cli.run("models", "update", model["id"], "--weights-source",
                                 "r2://models/../x")
    assert code == 1 and "weights_source" in err
    deployment = await cli.json("deployments", "create", "--model", "llama-8b", "--region",
                                "us-east-1", "--region", "us-west-2", "--gpu-type", "A10G",
                                "--spot", "--min", "1", "--max", "3")
    assert deployment["regions"] == ["us-east-1", "us-west-2"] and deployment["spot"] is True
    table = await cli.ok("deployments", "list")
    assert "us-east-1,us-west-2" in table
    assert (await cli.ok("deployments", "delete", deployment["id"])).strip() == \
        f"deleted deployment {deployment['id']}"
    assert await cli.ok("deployments", "list") == "(none)\n"


async def test_errors_print_the_api_message_and_exit_non_zero(cli: Cli, tmp_path: Path,
                                                              admin: Admin) -> None:
    code, out, err = await cli.run("deployments", "create", "--model", "nope", "--region",
                                   "r", "--gpu-type", "g", "--min", "2", "--max", "1")
    assert code == 1 and out == ""
    assert "max_nodes" in err  # the API's message, naming the field
    code, _, err = await cli.run("tenants", "get", "0192f1d4-0000-7000-8000-000000000000")
    assert code == 1 and "not found" in err
    code, _, err = await cli.run("tenants", "create", "")
    assert code == 1 and "name" in err

    wrong = Cli({**cli.env, "CROSSLOGIC_ADMIN_TOKEN": "wrong-token"})
    code, _, err = await wrong.run("tenants", "list")
    assert code == 1 and "Invalid X-Admin-Token" in err and "wrong-token" not in err

    none = Cli(base_env(tmp_path))
    code, _, err = await none.run("tenants", "list")
    assert code == 2 and "CROSSLOGIC_ADMIN_TOKEN" in err

    # A running `crosslogic dev` that wrote the admin URL and token is found by itself.
    state = tmp_path / "dev-state"
    state.mkdir()
    (state / "urls.json").write_text(json.dumps({"database_url": "postgresql://x",
                                                 "admin_url": admin.url,
                                                 "admin_token": TOKEN}))
    from_dev = Cli({**base_env(tmp_path), "CROSSLOGIC_STATE_DIR": str(state)})
    assert await from_dev.ok("tenants", "list") == "(none)\n"


async def test_rotate_sets_or_clears_the_successors_expiry(cli: Cli) -> None:
    tenant = await cli.json("tenants", "create", "Acme")
    env = await cli.json("environments", "create", tenant["id"], "production", "--region", "r")
    key = await cli.json("keys", "create", env["id"], "--expires", "2d")
    later = await cli.json("keys", "rotate", key["id"], "--expires", "10d")
    assert later["expires_at"] > key["expires_at"]
    kept = await cli.json("keys", "rotate", later["id"])
    assert kept["expires_at"] == later["expires_at"]
    never = await cli.json("keys", "rotate", kept["id"], "--no-expiry")
    assert never["expires_at"] is None
    code, _, err = await cli.run("keys", "rotate", never["id"], "--expires", "1d",
                                 "--no-expiry")
    assert code == 2 and "not allowed with" in err
