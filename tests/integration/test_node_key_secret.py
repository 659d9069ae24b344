"""NODE_API_KEY_SECRET: the orchestrator hands each node the key derived from it (a secret of
the launch, never its plain environment), and neither the orchestrator nor the gateway starts
without a strong one."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from services.infra.node_keys import NodeKeySecretError, node_api_key
from services.infra.settings import Secret
from services.orchestrator.app import create_orchestrator_app
from services.orchestrator.settings import OrchestratorSettings
from tests.conftest import Servers
from tests.integration.fleet_fixtures import Rig, rig  # noqa: F401  (fixture)


async def test_each_launch_carries_its_nodes_own_key(rig: Rig) -> None:  # noqa: F811
    secret = secrets.token_urlsafe(32)
    await rig.deploy(min_nodes=2, max_nodes=2)
    o = rig.orchestrator(node_api_key_secret=Secret(secret))
    await o.tick()
    await rig.settle()
    specs = rig.cloud.launches
    assert len(specs) == 2
    for spec in specs:
        assert spec.secrets["VLLM_API_KEY"] == node_api_key(secret, spec.node_id)
        assert "VLLM_API_KEY" not in spec.env
        assert spec.secrets["VLLM_API_KEY"] not in repr(spec)
    assert specs[0].secrets["VLLM_API_KEY"] != specs[1].secrets["VLLM_API_KEY"]


@pytest.mark.parametrize("secret", ["", "REPLACE_ME", "too-short"])
def test_the_orchestrator_refuses_a_weak_secret(servers: Servers, secret: str) -> None:
    settings = OrchestratorSettings(nats_node_issuer=Secret(servers.node_issuer()),
                                    node_api_key_secret=Secret(secret))
    with pytest.raises(NodeKeySecretError, match="NODE_API_KEY_SECRET"):
        create_orchestrator_app(settings)


@pytest.mark.parametrize("service", ["services.gateway", "services.orchestrator"])
@pytest.mark.parametrize("secret", [None, "Xq9-weak"])
def test_the_services_say_why_they_do_not_start(servers: Servers, service: str,
                                                 secret: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODE_API_KEY_SECRET"}
    env["NATS_NODE_ISSUER"] = servers.node_issuer()  # all the orchestrator needs but this
    if secret is not None:
        env["NODE_API_KEY_SECRET"] = secret
    done = subprocess.run([sys.executable, "-m", service], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "NODE_API_KEY_SECRET" in done.stderr and "Traceback" not in done.stderr
    assert "Xq9-weak" not in done.stderr  # a secret is never echoed, even a bad one
