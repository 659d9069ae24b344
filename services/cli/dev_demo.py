"""The demo of `crosslogic dev`: its tenant, environment, model, key and deployment, made
once per state folder, and what stands in the way of the demo key getting a completion."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg

from services.domain.catalog import Catalog
from services.infra.db import create_pool
from services.infra.eventlog import EventLog

DEMO_FILE = "demo.json"
DEMO_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class Demo:
    tenant_id: str
    environment_id: str
    key_id: str
    api_key: str
    admin_token: str


async def demo_problems(db: asyncpg.Pool[asyncpg.Record], demo: Demo) -> list[str]:
    """Why the demo key cannot get a completion, each with the command that fixes it."""
    problems: list[str] = []
    tenant = await db.fetchrow("SELECT status, status_reason FROM tenants WHERE id = $1::uuid",
                               demo.tenant_id)
    if tenant is not None and tenant["status"] != "active":
        why = f" ({tenant['status_reason']})" if tenant["status_reason"] else ""
        problems.append(f"the demo tenant {demo.tenant_id} is {tenant['status']}{why}: "
                        f"`crosslogic tenants reactivate {demo.tenant_id}`")
    env = await db.fetchval("SELECT status FROM environments WHERE id = $1::uuid",
                            demo.environment_id)
    if env is not None and env != "active":
        problems.append(f"the demo environment {demo.environment_id} is {env}: "
                        f"`crosslogic environments update {demo.environment_id} "
                        f"--status active`")
    model = await db.fetchrow("SELECT id, status FROM models WHERE name = $1", DEMO_MODEL)
    if model is None or model["status"] != "active":
        state = "not in the catalog" if model is None else model["status"]
        problems.append(f"the demo model {DEMO_MODEL} is {state}"
                        + ("" if model is None else
                           f": `crosslogic models update {model['id']} --status active`"))
    elif not await db.fetchval("SELECT 1 FROM deployments WHERE model_name = $1 "
                               "AND status = 'active'", DEMO_MODEL):
        problems.append(f"there is no deployment of {DEMO_MODEL} (the demo one was deleted), "
                        f"so no GPU node is launched: `crosslogic deployments create --model "
                        f"{DEMO_MODEL} --region local --gpu-type simulated --min 1 --max 2`")
    return problems


async def demo_data(database_url: str, state: Path) -> Demo:
    """The demo tenant, environment, model and key: made once, reused while the key lives."""
    demo_file = state / DEMO_FILE
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        try:
            demo = Demo(**json.loads(demo_file.read_text()))
            status = await pool.fetchval("SELECT status FROM api_keys WHERE id = $1::uuid",
                                         demo.key_id)
            if status == "active":
                return demo
        except (OSError, ValueError, TypeError):
            pass
        catalog = Catalog(EventLog(pool), actor="crosslogic-dev")
        if not await pool.fetchval("SELECT 1 FROM models WHERE name = $1", DEMO_MODEL):
            await catalog.create_model(DEMO_MODEL, family="llama", vram_gb=16,
                                       input_price_per_million=Decimal("0.10"),
                                       output_price_per_million=Decimal("0.20"),
                                       context_length=8192)
        if not await pool.fetchval("SELECT 1 FROM deployments WHERE model_name = $1 "
                                   "AND status = 'active'", DEMO_MODEL):
            await catalog.create_deployment(DEMO_MODEL, regions=["local"], gpu_type="simulated",
                                            spot=False, min_nodes=1, max_nodes=2)
        tenant = await catalog.create_tenant("Demo", "demo@example.com")
        env = await catalog.create_environment(tenant, "development", "local")
        key = await catalog.create_api_key(env, name="demo")
        demo = Demo(str(tenant), str(env), str(key.key_id), key.plaintext,
                    secrets.token_urlsafe(24))
        # Local dev state only: the folder is git-ignored and yours.
        demo_file.write_text(json.dumps(asdict(demo), indent=2))
        demo_file.chmod(0o600)
        return demo
    finally:
        await pool.close()
