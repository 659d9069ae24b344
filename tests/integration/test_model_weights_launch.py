"""A model's weights source, from the catalog to the machine: the orchestrator hands it to the
launcher with each launch; the local cloud loads a file:// directory (and refuses a missing
one, as a machine whose weights never arrived never serves), and the node serves the
model under its catalog name through the gateway."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from agent.local_cloud import CloudConfig, create_cloud_app
from services.domain.catalog import Catalog
from services.domain.catalog.weights import FileWeights, R2Weights
from services.orchestrator.launcher import LaunchError, LaunchSpec
from services.orchestrator.local_launcher import LocalLauncher
from tests.helpers import eventually
from tests.integration.fleet_fixtures import Fleet, Rig, fleet, rig  # noqa: F401  (fixtures)
from tests.integration.test_monitor_basics import serve

LOCAL_MODEL = "acme/llama-local"


async def add_model(catalog: Catalog, name: str, weights_source: str) -> None:
    await catalog.create_model(name, family="llama", vram_gb=16,
                               input_price_per_million=Decimal("0.1"),
                               output_price_per_million=Decimal("0.2"), context_length=8192,
                               weights_source=weights_source)


async def test_each_launch_carries_the_models_weights_source(rig: Rig) -> None:  # noqa: F811
    await add_model(rig.catalog, "acme/llama-r2", "r2://crosslogic-models/llama/v1")
    await rig.catalog.create_deployment("acme/llama-r2", regions=["aws/us-east-1"],
                                        gpu_type="A10G", spot=False, min_nodes=1, max_nodes=1)
    await rig.deploy()  # the fixture's model, with no source
    o = rig.orchestrator()
    await o.tick()
    await rig.settle()
    by_model = {s.model_name: s for s in rig.cloud.launches}
    assert by_model["acme/llama-r2"].weights == R2Weights("crosslogic-models", "llama/v1")
    assert by_model["meta-llama/Llama-3.1-8B-Instruct"].weights is None


@pytest.fixture
async def local_cloud(tmp_path: Path) -> AsyncIterator[str]:
    app = create_cloud_app(CloudConfig(log_dir=tmp_path / "machines", stop_timeout=2))
    url, runner = await serve(app)
    yield url
    await runner.cleanup()


async def test_the_local_cloud_refuses_weights_it_cannot_find(local_cloud: str,
                                                              tmp_path: Path) -> None:
    launcher = LocalLauncher(local_cloud, prefix="crosslogic")
    missing = tmp_path / "no-such-weights"
    spec = LaunchSpec(node_id=uuid.uuid4(), cluster_name="crosslogic-m-us-east-1-1a2b3c4d",
                      model_name=LOCAL_MODEL, provider="aws", region="us-east-1",
                      gpu_type="A10G", spot=False, weights=FileWeights(str(missing)))
    try:
        with pytest.raises(LaunchError, match="cannot load its weights") as err:
            await launcher.launch(spec)
        assert not err.value.capacity
        assert await launcher.clusters() == {}  # nothing was started
    finally:
        await launcher.close()


async def test_a_file_source_launches_and_serves_under_its_catalog_name(
        fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    weights = tmp_path / "weights" / "llama-local"
    weights.mkdir(parents=True)
    await add_model(fleet.catalog, LOCAL_MODEL, f"file://{weights}/")
    await fleet.start_cloud()
    await fleet.start_control_plane()
    dep = await fleet.catalog.create_deployment(LOCAL_MODEL, regions=["aws/us-east-1"],
                                                gpu_type="A10G", spot=False, min_nodes=1,
                                                max_nodes=1)
    (node,) = await fleet.wait_nodes("active", 1)
    assert (node["deployment_id"], node["model_name"]) == (dep, LOCAL_MODEL)
    machine = fleet.cloud.machines[node["cluster_name"]]
    assert machine.describe()["weights_source"] == f"file://{weights}"

    async def routable() -> bool:
        return bool(fleet.gw.table.candidates(LOCAL_MODEL, time.monotonic(),
                                              fleet.gw.proxy.rules))

    await eventually(routable, timeout=20, interval=0.02, what="the node routable")
    async with fleet.client() as client:
        reply = await client.chat.completions.create(
            model=LOCAL_MODEL, max_tokens=4, messages=[{"role": "user", "content": "hello"}])
        models = [m.id async for m in client.models.list()]
    assert reply.model == LOCAL_MODEL
    assert LOCAL_MODEL in models
