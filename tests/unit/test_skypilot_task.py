"""The SkyPilot task a node is launched with, validated offline by SkyPilot's own schema, and
the launcher's pure helpers (cluster names, regions, the agent's environment)."""

from __future__ import annotations

import copy
import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sky
import sky.exceptions

from agent.settings import AgentSettings
from services.domain.catalog.weights import parse_weights_source
from services.orchestrator.launcher import (
    LaunchSpec,
    cluster_name,
    cluster_prefix,
    node_env,
    owns_cluster,
    split_region,
)
from services.orchestrator.skypilot_task import (
    NODE_FACTS,
    VLLM_PORT,
    WEIGHTS_DIR,
    TaskOptions,
    UnservableWeights,
    accelerators,
    task_config,
)

NODE_ID = uuid.UUID("0190f3a1-7c2e-7d4b-9a1f-1a2b3c4d5e6f")
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
NATS_URL = "nats://orchestrator:s3cr3t-pa55@nats.internal:4222"
PREFIX = "crosslogic"


def spec_for(infra: str, gpu_type: str, *, spot: bool, node_id: uuid.UUID = NODE_ID,
             extra_secrets: dict[str, str] | None = None,
             weights: str | None = None) -> LaunchSpec:
    """A spec built the way the orchestrator builds one; `weights`: the model's source."""
    provider, region = split_region(infra, "aws")
    cluster = cluster_name(PREFIX, MODEL, region, node_id)
    env, secrets = node_env(node_id, cluster=cluster, model_name=MODEL, provider=provider,
                            region=region, gpu_type=gpu_type, spot=spot, heartbeat_interval=5.0,
                            nats_url=NATS_URL)
    secrets.update(extra_secrets or {})
    return LaunchSpec(node_id=node_id, cluster_name=cluster, model_name=MODEL,
                      provider=provider, region=region, gpu_type=gpu_type, spot=spot,
                      env=env, secrets=secrets,
                      weights=None if weights is None else parse_weights_source(weights))


def to_task(config: dict[str, Any]) -> sky.Task:
    # from_yaml_config mutates its argument: hand it a copy.
    return sky.Task.from_yaml_config(copy.deepcopy(config))


def only_resources(task: sky.Task) -> sky.Resources:
    resources = list(task.resources)
    assert len(resources) == 1
    return resources[0]


CLOUDS = [
    ("aws/us-east-1", "A10G", "AWS", "us-east-1", {"A10G": 1}),
    ("gcp/us-central1", "L4", "GCP", "us-central1", {"L4": 1}),
    ("azure/eastus", "A100", "Azure", "eastus", {"A100": 1}),
]
CASES = [pytest.param(*c, spot, id=f"{c[0].split('/')[0]}-{'spot' if spot else 'on-demand'}")
         for c in CLOUDS for spot in (True, False)]


# ----------------------------------------------------------------- the task, through SkyPilot


@pytest.mark.parametrize(("infra", "gpu", "cloud", "region", "accel", "spot"), CASES)
def test_task_is_valid_for_skypilot(infra: str, gpu: str, cloud: str, region: str,
                                    accel: dict[str, int], spot: bool) -> None:
    spec = spec_for(infra, gpu, spot=spot)
    config = task_config(spec, TaskOptions(disk_size_gb=300))
    task = to_task(config)

    r = only_resources(task)
    assert str(r.cloud) == cloud
    assert r.region == region
    assert r.accelerators == accel
    assert r.use_spot is spot
    # No port opened to the internet (vLLM's key is one defence, the private network another):
    # the control plane reaches the node's private address.
    assert not r.ports
    assert r.disk_size == 300
    assert r.labels == {"crosslogic-node-id": str(NODE_ID)}

    assert task.name == spec.cluster_name
    assert task.run is not None and "python3 -m agent" in task.run
    assert task.setup is not None and "vllm==" in task.setup

    provider = infra.split("/")[0]
    assert task.envs["NODE_ID"] == str(NODE_ID)
    assert task.envs["CLUSTER_NAME"] == spec.cluster_name
    assert task.envs["MODEL_NAME"] == MODEL
    assert task.envs["PROVIDER"] == provider
    assert task.envs["REGION"] == region
    assert task.envs["GPU_TYPE"] == gpu
    assert task.envs["SPOT_INSTANCE"] == ("true" if spot else "false")
    assert task.envs["VLLM_PORT"] == str(VLLM_PORT)

    secrets = {k: v.get_secret_value() if hasattr(v, "get_secret_value") else v
               for k, v in task.secrets.items()}
    assert secrets == {"NATS_URL": NATS_URL}
    assert "NATS_URL" not in task.envs
    assert all("s3cr3t" not in v for v in task.envs.values())


# ----------------------------------------------------------------- what only the machine knows

# Stand-ins for the machine: its driver, its cloud's metadata service, its network.
_FAKE_NVIDIA_SMI = """#!/bin/sh
[ -n "${GPUS_MIB:-}" ] || exit 9
for m in $GPUS_MIB; do echo "$m"; done
"""
_FAKE_CURL = """#!/bin/sh
args="$*"
case "$args" in
  *"-X PUT"*latest/api/token*) [ "$PROVIDER" = aws ] && echo "imds-token" && exit 0 ;;
  *"X-aws-ec2-metadata-token: imds-token"*meta-data/instance-type*) echo "g5.12xlarge";
                                                                   exit 0 ;;
  *"Metadata-Flavor: Google"*instance/machine-type*)
    echo "projects/123/zones/us-central1-a/machineTypes/g2-standard-8"; exit 0 ;;
  *"Metadata: true"*compute/vmSize*"format=text"*) echo "Standard_NC24ads_A100_v4";
                                                   exit 0 ;;
esac
exit 22
"""
_FAKE_HOSTNAME = """#!/bin/sh
echo "10.0.3.17 172.17.0.1"
"""


def node_facts(tmp_path: Path, provider: str, gpus_mib: str = "",
               metadata_down: bool = False) -> dict[str, str]:
    """Run the task's preamble on a stand-in machine; the agent's environment after it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("nvidia-smi", _FAKE_NVIDIA_SMI), ("hostname", _FAKE_HOSTNAME),
                       ("curl", "#!/bin/sh\nexit 7\n" if metadata_down else _FAKE_CURL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    script = ("set -uo pipefail\n" + NODE_FACTS
              + 'echo "$INSTANCE_TYPE|$VRAM_TOTAL_GB|$ENDPOINT_URL|$VLLM_URL"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PROVIDER": provider,
           "VLLM_PORT": str(VLLM_PORT), "GPUS_MIB": gpus_mib}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    instance, vram, endpoint, vllm = out.split("|")
    return {"INSTANCE_TYPE": instance, "VRAM_TOTAL_GB": vram, "ENDPOINT_URL": endpoint,
            "VLLM_URL": vllm}


@pytest.mark.parametrize(("provider", "gpus_mib", "instance", "vram"), [
    ("aws", "23028 23028 23028 23028", "g5.12xlarge", "89"),
    ("gcp", "23034", "g2-standard-8", "22"),
    ("azure", "81920", "Standard_NC24ads_A100_v4", "80"),
])
def test_the_agent_learns_its_machine(tmp_path: Path, provider: str, gpus_mib: str,
                                      instance: str, vram: str) -> None:
    facts = node_facts(tmp_path, provider, gpus_mib)
    assert facts == {"INSTANCE_TYPE": instance, "VRAM_TOTAL_GB": vram,
                     "ENDPOINT_URL": f"http://10.0.3.17:{VLLM_PORT}",
                     "VLLM_URL": f"http://127.0.0.1:{VLLM_PORT}"}
    # The names the agent reads its settings from.
    assert {"instance_type", "vram_total_gb", "endpoint_url", "vllm_url"} <= set(
        AgentSettings.__struct_fields__)


_FAKE_VLLM = """#!/bin/sh
{ echo "args=$*"; echo "key=${VLLM_API_KEY:-}"; } > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
"""
# The agent: waits (bounded) for vLLM's stand-in to have started, as the real one polls it.
_FAKE_PYTHON = """#!/bin/sh
i=0
while [ ! -f "$OUT" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
echo "agent ran" >> "$OUT.agent"
"""


def run_script(tmp_path: Path, env: dict[str, str],
               weights: str | None = None) -> subprocess.CompletedProcess[str]:
    """The task's whole run script on a stand-in machine (vLLM and the agent are stubs), with
    the task's own environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("nvidia-smi", _FAKE_NVIDIA_SMI), ("hostname", _FAKE_HOSTNAME),
                       ("curl", _FAKE_CURL), ("vllm", _FAKE_VLLM), ("python3", _FAKE_PYTHON)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    config = task_config(spec_for("aws/us-east-1", "A10G", spot=True, weights=weights),
                         TaskOptions())
    base = {**config["envs"], "PATH": f"{bin_dir}:/usr/bin:/bin", "GPUS_MIB": "23028",
            "OUT": str(tmp_path / "vllm")}
    run = config["run"]
    return subprocess.run(["bash", "-c", run], env={**base, **env}, capture_output=True,
                          text=True, timeout=30)


def test_vllm_serves_with_the_nodes_key_from_the_environment(tmp_path: Path) -> None:
    done = run_script(tmp_path, {"VLLM_API_KEY": "clnk_the-node-key"})
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "vllm").read_text().splitlines())
    # vLLM reads VLLM_API_KEY itself: the key is in its environment, not on its command
    # line (which vLLM logs at start and every process on the machine can read).
    assert seen["key"] == "clnk_the-node-key"
    assert "clnk_the-node-key" not in seen["args"]
    assert seen["args"] == f"serve {MODEL} --host 0.0.0.0 --port {VLLM_PORT}"
    assert (tmp_path / "vllm.agent").exists()


def served(tmp_path: Path, weights: str | None) -> str:
    done = run_script(tmp_path, {"VLLM_API_KEY": "clnk_the-node-key"}, weights)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "vllm").read_text().splitlines())
    return seen["args"]


@pytest.mark.parametrize(("weights", "args"), [
    # No source: as before, vLLM fetches the Hub repo of the model's name.
    (None, f"serve {MODEL} --host 0.0.0.0 --port {VLLM_PORT}"),
    # Another repo, served under the catalog's name.
    ("hf://acme/llama-tuned", f"serve acme/llama-tuned --served-model-name {MODEL} "
                              f"--host 0.0.0.0 --port {VLLM_PORT}"),
    # The copy SkyPilot made of the bucket's prefix, served under the catalog's name.
    ("r2://crosslogic-models/llama/v1", f"serve {WEIGHTS_DIR} --served-model-name {MODEL} "
                                        f"--host 0.0.0.0 --port {VLLM_PORT}"),
])
def test_vllm_serves_the_weights_under_the_catalog_name(tmp_path: Path, weights: str | None,
                                                        args: str) -> None:
    assert served(tmp_path, weights) == args


@pytest.mark.parametrize("key", [None, ""])
def test_no_key_no_vllm(tmp_path: Path, key: str | None) -> None:
    """An empty VLLM_API_KEY would be vLLM without authentication: the node does not start."""
    done = run_script(tmp_path, {} if key is None else {"VLLM_API_KEY": key})
    assert done.returncode == 78
    assert "VLLM_API_KEY is not set" in done.stderr
    assert not (tmp_path / "vllm").exists() and not (tmp_path / "vllm.agent").exists()


def test_a_machine_that_cannot_say_still_starts(tmp_path: Path) -> None:
    facts = node_facts(tmp_path, "aws", gpus_mib="", metadata_down=True)
    assert (facts["INSTANCE_TYPE"], facts["VRAM_TOTAL_GB"]) == ("unknown", "0")


def test_the_run_script_starts_from_the_machine_facts() -> None:
    config = task_config(spec_for("aws/us-east-1", "A10G", spot=True), TaskOptions())
    run = config["run"]
    assert NODE_FACTS in run
    assert run.index(NODE_FACTS) < run.index("vllm serve") < run.index("python3 -m agent")


def test_options_reach_the_task() -> None:
    options = TaskOptions(agent_install="crosslogic==1.2.3", vllm_version="0.10.2",
                          disk_size_gb=512)
    task = to_task(task_config(spec_for("aws/us-east-1", "A10G", spot=True), options))
    assert task.envs["AGENT_INSTALL"] == "crosslogic==1.2.3"
    assert task.envs["VLLM_VERSION"] == "0.10.2"
    assert task.envs["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"  # stored responses are served
    assert only_resources(task).disk_size == 512


def test_multi_gpu_type_passes_through() -> None:
    task = to_task(task_config(spec_for("gcp/us-central1", "A100:4", spot=False),
                               TaskOptions()))
    assert only_resources(task).accelerators == {"A100": 4}


def test_all_secrets_stay_out_of_envs() -> None:
    spec = spec_for("aws/us-east-1", "A10G", spot=True,
                    extra_secrets={"NATS_PASSWORD": "pw-123", "HF_TOKEN": "hf_abc",
                                   "VLLM_API_KEY": "clnk_node-key"})
    task = to_task(task_config(spec, TaskOptions()))
    assert set(task.secrets) == {"NATS_URL", "NATS_PASSWORD", "HF_TOKEN", "VLLM_API_KEY"}
    assert not set(task.secrets) & set(task.envs)
    assert all(v not in ("pw-123", "hf_abc", "clnk_node-key") for v in task.envs.values())
    assert "clnk_node-key" not in task_config(spec, TaskOptions())["run"]


def test_nodes_install_a_current_vllm_by_default() -> None:
    from services.orchestrator.settings import OrchestratorSettings

    default = TaskOptions().vllm_version
    assert default == OrchestratorSettings().skypilot_vllm_version == "0.34.0"
    major, minor = (int(part) for part in default.split(".")[:2])
    assert (major, minor) >= (0, 20)  # the first releases without the known advisories


def test_task_config_does_not_share_the_specs_dicts() -> None:
    spec = spec_for("aws/us-east-1", "A10G", spot=True)
    config = task_config(spec, TaskOptions())
    to_task(config)  # validated on a copy; and even if it were not ...
    config["envs"]["NODE_ID"] = "changed"
    config["secrets"]["NATS_URL"] = "changed"
    assert spec.env["NODE_ID"] == str(NODE_ID)
    assert spec.secrets["NATS_URL"] == NATS_URL


# ----------------------------------------------------------------- where the weights come from


@pytest.mark.parametrize("spot", [True, False])
def test_r2_weights_are_copied_by_skypilot(spot: bool) -> None:
    spec = spec_for("aws/us-east-1", "A10G", spot=spot,
                    weights="r2://crosslogic-models/meta/llama-3.1-8b/")
    config = task_config(spec, TaskOptions())
    assert config["file_mounts"] == {
        WEIGHTS_DIR: {"source": "r2://crosslogic-models/meta/llama-3.1-8b", "mode": "COPY"}}
    task = to_task(config)

    # SkyPilot's own reading: a storage mount of the bucket's prefix, copied (not a FUSE
    # mount: SkyPilot mounts whole buckets only), from R2.
    (path, storage), = task.storage_mounts.items()
    assert path == WEIGHTS_DIR
    assert storage.source == "r2://crosslogic-models/meta/llama-3.1-8b"
    assert storage.mode.name == "COPY"
    assert not only_resources(task).requires_fuse
    assert task.envs["MODEL_WEIGHTS"] == WEIGHTS_DIR
    assert task.envs["MODEL_NAME"] == MODEL  # what vLLM serves it as
    assert task.run is not None and '--served-model-name "${MODEL_NAME}"' in task.run
    # The R2 credentials are SkyPilot's (its ~/.cloudflare/ files), never the task's.
    assert set(task.secrets) == {"NATS_URL"}


def test_hub_weights_need_no_mount() -> None:
    config = task_config(spec_for("gcp/us-central1", "L4", spot=False,
                                  weights="hf://acme/llama-tuned"), TaskOptions())
    assert "file_mounts" not in config
    task = to_task(config)
    assert task.envs["MODEL_WEIGHTS"] == "acme/llama-tuned"
    assert not task.storage_mounts and not task.file_mounts


def test_a_model_without_a_source_is_served_by_its_name_as_before() -> None:
    config = task_config(spec_for("aws/us-east-1", "A10G", spot=True), TaskOptions())
    assert "file_mounts" not in config
    assert "MODEL_WEIGHTS" not in config["envs"]
    assert 'vllm serve "${MODEL_NAME}" --host' in config["run"]
    assert "--served-model-name" not in config["run"]


def test_a_path_on_this_host_is_refused_for_skypilot() -> None:
    spec = spec_for("aws/us-east-1", "A10G", spot=True, weights="file:///srv/models/llama")
    with pytest.raises(UnservableWeights, match=r"file:///srv/models/llama.*local cloud"):
        task_config(spec, TaskOptions())


def test_the_weights_mount_is_checked_by_skypilot() -> None:
    config = task_config(spec_for("aws/us-east-1", "A10G", spot=True,
                                  weights="r2://crosslogic-models/llama"), TaskOptions())
    config["file_mounts"][WEIGHTS_DIR]["mode"] = "SOMETIMES"
    with pytest.raises(sky.exceptions.InvalidSkyPilotConfigError, match="SOMETIMES"):
        to_task(config)


# ----------------------------------------------------------------- the validation has teeth


@pytest.mark.parametrize(("breakage", "complaint"), [
    pytest.param(lambda c: c["resources"].update(use_spot="yes"), r"use_spot",
                 id="use_spot-not-bool"),
    pytest.param(lambda c: c.update(crosslogic_extra=1), r"unsupported field 'crosslogic_extra'",
                 id="unknown-top-level-field"),
    pytest.param(lambda c: c["resources"].update(gpus_please=1),
                 r"unsupported field 'gpus_please'", id="unknown-resources-field"),
    pytest.param(lambda c: c["resources"].update(disk_size="big"), r"'big'",
                 id="disk_size-not-a-size"),
    pytest.param(lambda c: c.update(num_nodes="two"), r"num_nodes", id="num_nodes-not-int"),
])
def test_broken_config_is_rejected(breakage: Callable[[dict[str, Any]], None],
                                   complaint: str) -> None:
    config = task_config(spec_for("aws/us-east-1", "A10G", spot=True), TaskOptions())
    to_task(config)  # the unbroken one is fine
    breakage(config)
    with pytest.raises(sky.exceptions.InvalidSkyPilotConfigError, match=complaint):
        to_task(config)


# ----------------------------------------------------------------- accelerators


@pytest.mark.parametrize(("gpu", "expected"), [
    ("A10G", "A10G:1"),
    ("L4", "L4:1"),
    ("A100:4", "A100:4"),
    ("H100:8", "H100:8"),
])
def test_accelerators(gpu: str, expected: str) -> None:
    assert accelerators(gpu) == expected


# ----------------------------------------------------------------- cluster names


@pytest.mark.parametrize(("raw", "normal"), [
    ("crosslogic", "crosslogic"),
    ("CrossLogic", "crosslogic"),
    ("CrossLogic_Prod", "crosslogic-prod"),
    ("  team.A  ", "team-a"),
    ("a-very-long-platform-prefix-for-staging", "a-very-long-platform-pre"),
    ("abcdefghijklmnopqrstuvw-xyz", "abcdefghijklmnopqrstuvw"),  # no dash left at the cut
    ("___", "crosslogic"),
])
def test_cluster_prefix_is_normalised_once(raw: str, normal: str) -> None:
    assert cluster_prefix(raw) == normal
    name = cluster_name(raw, MODEL, "us-east-1", NODE_ID)
    assert name.startswith(normal + "-") and "--" not in name
    assert owns_cluster(raw, name)


@pytest.mark.parametrize(("prefix", "name", "ours"), [
    ("crosslogic", "crosslogic-llama-us-east-1-1a2b3c4d", True),
    ("crosslogic", "crosslogic2-llama-us-east-1-1a2b3c4d", False),
    ("crosslogic", "crosslogicprod-llama-1a2b3c4d", False),
    ("crosslogic", "crosslogic", False),
    ("crosslogic", "other-crosslogic-1a2b3c4d", False),
    ("CrossLogic_Prod", "crosslogic-prod-llama-1a2b3c4d", True),
    ("CrossLogic_Prod", "crosslogic-llama-1a2b3c4d", False),
])
def test_owns_cluster(prefix: str, name: str, ours: bool) -> None:
    assert owns_cluster(prefix, name) is ours


_VALID = re.compile(r"^[a-z0-9-]+$")


def test_cluster_name_is_readable() -> None:
    node_id = uuid.UUID("0190f3a1-7c2e-7d4b-9a1f-00001a2b3c4d")
    assert cluster_name("crosslogic", MODEL, "us-east-1", node_id) == \
        "crosslogic-llama-3-1-8b-instruct-us-east-1-1a2b3c4d"


@pytest.mark.parametrize(("model", "region"), [
    (MODEL, "us-east-1"),
    ("Qwen/Qwen2.5-72B-Instruct-AWQ", "us-central1"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "eastus"),
    ("some_org/Model_With.Dots__and___Underscores", "europe-west4"),
    ("org/" + "Very-Long-Model-Name-" * 10, "ap-southeast-1"),
    ("x" * 200, "us-east-1"),
    ("-Leading-and-trailing-", "-us-east-1-"),
    ("UPPER/CASE", "US-EAST-1"),
])
def test_cluster_name_is_valid_everywhere(model: str, region: str) -> None:
    node_id = uuid.uuid4()
    name = cluster_name(PREFIX, model, region, node_id)
    assert _VALID.match(name), name
    assert len(name) <= 63
    assert name.startswith(PREFIX + "-")
    assert name.endswith("-" + node_id.hex[-8:])
    assert "--" not in name
    assert not name.endswith("-") and name[0].isalpha()


def test_cluster_name_drops_the_org() -> None:
    name = cluster_name(PREFIX, "meta-llama/Llama-3.1-8B", "us-east-1", NODE_ID)
    assert "meta" not in name
    assert "llama-3-1-8b" in name


def test_long_model_name_is_truncated_to_63() -> None:
    name = cluster_name(PREFIX, "org/" + "a" * 300, "us-east-1", NODE_ID)
    assert len(name) == 63
    assert name.endswith("-" + NODE_ID.hex[-8:])


def test_cluster_name_is_unique_per_node() -> None:
    ids = [uuid.uuid4() for _ in range(200)]
    names = {cluster_name(PREFIX, MODEL, "us-east-1", i) for i in ids}
    assert len(names) == len(ids)


def test_cluster_name_unique_for_uuid7_siblings() -> None:
    # Node ids are UUIDv7: ids made in the same millisecond share their leading bits, so the
    # suffix must come from the random end.
    a = uuid.UUID("0190f3a1-7c2e-7d4b-9a1f-1a2b3c4d5e6f")
    b = uuid.UUID("0190f3a1-7c2e-7d4b-9a1f-1a2b3c4d5e70")
    assert cluster_name(PREFIX, MODEL, "us-east-1", a) != cluster_name(PREFIX, MODEL,
                                                                       "us-east-1", b)


def test_cluster_name_is_accepted_by_skypilot() -> None:
    spec = spec_for("aws/us-east-1", "A10G", spot=True)
    sky.utils.common_utils.check_cluster_name_is_valid(spec.cluster_name)


# ----------------------------------------------------------------- regions


@pytest.mark.parametrize(("value", "expected"), [
    ("aws/us-east-1", ("aws", "us-east-1")),
    ("gcp/us-central1", ("gcp", "us-central1")),
    ("AZURE/eastus", ("azure", "eastus")),
    ("local/dev", ("local", "dev")),
    ("us-west-2", ("aws", "us-west-2")),
    ("eastus", ("aws", "eastus")),
])
def test_split_region(value: str, expected: tuple[str, str]) -> None:
    assert split_region(value, "aws") == expected


def test_split_region_bare_uses_the_default_provider() -> None:
    assert split_region("us-central1", "gcp") == ("gcp", "us-central1")


# ----------------------------------------------------------------- the agent's environment


def test_node_env_splits_plain_from_secret() -> None:
    env, secrets = node_env(NODE_ID, cluster="c-1", model_name=MODEL, provider="gcp",
                            region="us-central1", gpu_type="L4", spot=False,
                            heartbeat_interval=2.5, nats_url=NATS_URL)
    assert env == {
        "NODE_ID": str(NODE_ID),
        "CLUSTER_NAME": "c-1",
        "MODEL_NAME": MODEL,
        "PROVIDER": "gcp",
        "REGION": "us-central1",
        "GPU_TYPE": "L4",
        "SPOT_INSTANCE": "false",
        "HEARTBEAT_INTERVAL": "2.5",
    }
    assert secrets == {"NATS_URL": NATS_URL}


def test_node_env_heartbeat_interval_formatting() -> None:
    env, _ = node_env(NODE_ID, cluster="c", model_name=MODEL, provider="aws",
                      region="us-east-1", gpu_type="A10G", spot=True, heartbeat_interval=5.0,
                      nats_url=NATS_URL)
    assert env["HEARTBEAT_INTERVAL"] == "5"
    assert env["SPOT_INSTANCE"] == "true"


def test_launch_spec_repr_hides_credentials() -> None:
    spec = spec_for("aws/us-east-1", "A10G", spot=True,
                    extra_secrets={"NATS_PASSWORD": "pw-123", "HF_TOKEN": "hf_abc"})
    text = repr(spec)
    assert "s3cr3t" not in text
    assert NATS_URL not in text
    assert "pw-123" not in text and "hf_abc" not in text
    assert spec.cluster_name in text  # it is a repr, not an empty string
    assert str(spec) == text
