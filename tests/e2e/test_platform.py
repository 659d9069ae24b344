"""The whole platform as a new operator meets it: `crosslogic dev`, the CLI, the openai SDK.

Each test starts `crosslogic dev` as a real process (embedded servers, every service, a
simulated GPU node) in its own state folder."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from services.cli.dev_banner import python_command
from tests.helpers import eventually, live_parents, process_alive

CLI = [sys.executable, "-m", "services.cli"]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class Dev:
    proc: asyncio.subprocess.Process
    state: Path
    banner: str
    stderr: Path
    """Its progress lines."""

    def progress(self) -> str:
        return self.stderr.read_text(errors="replace")

    @property
    def gateway(self) -> str:
        found = re.search(r"gateway\s+(http://\S+)", self.banner)
        assert found
        return found.group(1)

    @property
    def demo_key(self) -> str:
        found = re.search(r"clsk_live_\w+", self.banner)
        assert found
        return found.group(0)

    def client(self, key: str) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.gateway}/v1", api_key=key, max_retries=0)

    async def cli(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "CROSSLOGIC_ADMIN_URL", "CROSSLOGIC_ADMIN_TOKEN",
                            "ADMIN_API_TOKEN")}
        env["CROSSLOGIC_STATE_DIR"] = str(self.state)
        proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (args, err.decode())
        return out.decode()

    async def cli_json(self, *args: str) -> Any:
        return json.loads(await self.cli(*args, "--json"))

    def descendants(self) -> set[int]:
        """Every process started under `crosslogic dev` (servers, services, node)."""
        parents = live_parents()
        found: set[int] = set()
        frontier = {self.proc.pid}
        while frontier:
            children = {p for p, parent in parents.items() if parent in frontier}
            frontier = children - found
            found |= children
        return found

    async def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 60)


async def start_dev(state: Path, *extra: str) -> Dev:
    runs = len(list(state.parent.glob("dev-*.stderr")))
    stderr = state.parent / f"dev-{runs}.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "dev", "--state-dir", str(state), *extra, stdout=asyncio.subprocess.PIPE,
            stderr=err)
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()
        assert line, ("crosslogic dev exited before the platform was up",
                      stderr.read_text(errors="replace"))
        lines.append(line)
        if "crosslogic tenants list" in line:  # the banner's last line
            return Dev(proc, state, "".join(lines), stderr)


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[Dev]:
    running = await start_dev((tmp_path / "dev").resolve())
    yield running
    if running.proc.returncode is None:
        running.proc.kill()
        await running.proc.wait()


async def test_a_new_operators_first_hour(dev: Dev) -> None:
    # The servers' URLs were shown (and urls.json written) as soon as they were up, before
    # the long wait for the first completion.
    progress = dev.progress()
    urls = json.loads((dev.state / "urls.json").read_text())
    for name, key in (("postgres", "database_url"), ("redis", "redis_url"),
                      ("nats", "nats_url")):
        line = f"{name:<9} {urls[key]}"
        assert line in progress and line in dev.banner
        assert progress.index(line) < progress.index("a completion went through")
    # The openai snippet names this interpreter (the venv's), and works as printed.
    assert f"  {python_command()} -c 'from openai import OpenAI" in dev.banner
    snippet = dev.banner[dev.banner.index("-c 'from openai"):].split("'", 2)[1]
    ran = await asyncio.create_subprocess_exec(sys.executable, "-c", snippet,
                                               stdout=asyncio.subprocess.PIPE)
    printed, _ = await asyncio.wait_for(ran.communicate(), 60)
    assert ran.returncode == 0 and printed.strip()

    # The banner's curl works as printed.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]})
    request = urllib.request.Request(f"{dev.gateway}/v1/chat/completions", data=body.encode(),
                                     headers={"Authorization": f"Bearer {dev.demo_key}",
                                              "Content-Type": "application/json"})
    answer = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(request)))
    assert answer["choices"][0]["message"]["content"]

    # The simulated GPU node, seen by the operator.
    (node,) = await dev.cli_json("nodes", "list")
    assert node["model_name"] == MODEL and node["heartbeat"]["vllm_healthy"]
    table = await dev.cli("nodes", "list")
    assert node["id"] in table and "HEARTBEAT AGE S" in table

    # A tenant, an environment and a key, through the CLI.
    tenant = await dev.cli_json("tenants", "create", "Acme", "--email", "ops@acme.test")
    env = await dev.cli_json("environments", "create", tenant["id"], "production",
                             "--region", "local")
    out = await dev.cli("keys", "create", env["id"], "--name", "first")
    (key,) = re.findall(r"clsk_live_\w+", out)

    # The openai SDK with the new key.
    client = dev.client(key)
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert reply.usage is not None and reply.usage.completion_tokens == 8

    # Usage, read back by the tenant itself.
    async def billed() -> dict[str, Any] | None:
        usage = await client.get("/usage", cast_to=object)
        return usage if usage["data"] else None  # type: ignore[index,return-value]

    usage = await eventually(billed, timeout=20, what="usage recorded")
    (row,) = usage["data"]
    assert (row["requests"], row["completion_tokens"], row["tenant_id"]) == \
        (1, 8, tenant["id"])

    # Revoked through the CLI: refused at once.
    keys = await dev.cli_json("keys", "list", "--tenant", tenant["id"])
    await dev.cli("keys", "revoke", keys[0]["id"])

    async def refused() -> bool:
        try:
            await client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    await eventually(refused, timeout=2, what="the revoked key refused")
    await client.close()

    # Ctrl-C stops everything it started.
    children = dev.descendants()
    assert len(children) >= 8
    assert await dev.stop(signal.SIGINT) == 0

    assert not any(process_alive(pid) for pid in children)

    # The state folder survives: the demo key works again after a restart.
    again = await start_dev(dev.state)
    try:
        assert again.demo_key == dev.demo_key
        restarted = again.client(again.demo_key)
        assert [m.id async for m in restarted.models.list()] == [MODEL]
        await restarted.close()
    finally:
        assert await again.stop(signal.SIGTERM) == 0


async def test_a_suspended_demo_a_double_ctrl_c_and_a_fresh_start(dev: Dev) -> None:
    demo = json.loads((dev.state / "demo.json").read_text())
    await dev.cli("tenants", "suspend", demo["tenant_id"], "--reason", "unpaid")

    # A second Ctrl-C while stopping hurries the shutdown; it never skips the servers.
    children = dev.descendants()
    dev.proc.send_signal(signal.SIGINT)

    async def stopping() -> bool:
        return "stopping" in dev.progress()

    await eventually(stopping, what="shutdown begun")
    dev.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(dev.proc.wait(), 60) == 0

    async def all_gone() -> bool:
        return not any(process_alive(pid) for pid in children)

    await eventually(all_gone, timeout=20, what="servers and services stopped")
    assert not (dev.state / "urls.json").exists()

    # Restarted with the demo tenant suspended: said at once, no wait for a completion that
    # cannot come.
    suspended = await start_dev(dev.state)
    try:
        assert "Heads-up" in suspended.banner
        assert f"the demo tenant {demo['tenant_id']} is suspended (unpaid)" in suspended.banner
        assert f"crosslogic tenants reactivate {demo['tenant_id']}" in suspended.banner
        assert "a completion went through" not in suspended.progress()
    finally:
        assert await suspended.stop(signal.SIGTERM) == 0

    # --fresh: a new platform, a new demo that works.
    fresh = await start_dev(dev.state, "--fresh")
    try:
        assert fresh.demo_key != dev.demo_key and "Heads-up" not in fresh.banner
        assert json.loads((dev.state / "demo.json").read_text())["tenant_id"] != \
            demo["tenant_id"]
        client = fresh.client(fresh.demo_key)
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.choices[0].message.content
        await client.close()
    finally:
        assert await fresh.stop(signal.SIGINT) == 0


async def test_dev_killed_hard_leaves_no_orphans(dev: Dev) -> None:
    children = dev.descendants()
    assert len(children) >= 8
    dev.proc.kill()
    await dev.proc.wait()

    async def all_gone() -> bool:
        return not any(process_alive(pid) for pid in children)

    await eventually(all_gone, timeout=20, what="everything died with crosslogic dev")


