"""The SkyPilot task for one GPU node, as the dict `sky.Task.from_yaml_config` takes (the
same shape as a task YAML). Pure: tests validate it against SkyPilot's own schema.

The machine installs vLLM and the agent, starts vLLM on VLLM_PORT, and runs the agent in the
foreground with the environment `launcher.node_env` gives it, plus what only the machine
knows: its instance type (from the cloud's metadata service) and its GPUs' memory (from the
driver). The node's NATS credential, its vLLM API key (VLLM_API_KEY) and the Hugging Face
token go in `secrets`, which SkyPilot keeps out of its listings and logs.

The weights: a model without a source is served by its name, which vLLM fetches from the
Hugging Face Hub; an hf:// source is fetched the same way; an r2:// source is copied by
SkyPilot itself (`file_mounts`, COPY mode, with the R2 credentials of the SkyPilot that
launches) to WEIGHTS_DIR before the run starts. Either way vLLM serves the weights under the
catalog's name (`--served-model-name`), which is what clients and the gateways ask for.

vLLM serves only who presents the node's own key (the gateways derive it: see
services/infra/node_keys.py). It reads the key from VLLM_API_KEY, as `vllm serve` does, rather
than from `--api-key`: vLLM logs its non-default arguments at start, and a command line is
readable by every process on the machine. The run refuses to start vLLM without a key.

No port is opened either: SkyPilot's `ports` opens them to the whole internet. The agent
advertises the machine's private address, and the gateways reach it over the private network —
the operator grants that in SkyPilot's own config (a VPC and a security group / firewall rule
that admits the control plane on VLLM_PORT; see docs/orchestrator.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.domain.catalog.weights import FileWeights, HubWeights, R2Weights
from services.orchestrator.launcher import LaunchSpec

VLLM_PORT = 8000
WEIGHTS_DIR = "/crosslogic/weights"
"""Where an R2 source is copied on the machine (SkyPilot's COPY mode: onto the node's disk
before `setup`, so vLLM reads local files, not a FUSE mount)."""


class UnservableWeights(ValueError):
    """A weights source a SkyPilot machine cannot reach (file://: a path on another host)."""


_SETUP = """\
set -euo pipefail
python3 -m pip install --upgrade pip uv
python3 -m uv pip install --system "vllm==${VLLM_VERSION}" "${AGENT_INSTALL}"
"""

# What the agent registers with that only the machine knows. Best effort: a metadata service
# or driver that does not answer leaves "unknown" and 0, never a failed start.
NODE_FACTS = """\
instance_type() {
  case "${PROVIDER}" in
    aws)
      local token
      token="$(curl -sf -m 2 -X PUT http://169.254.169.254/latest/api/token \\
               -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')" || return 0
      curl -sf -m 2 -H "X-aws-ec2-metadata-token: ${token}" \\
           http://169.254.169.254/latest/meta-data/instance-type ;;
    gcp)
      curl -sf -m 2 -H 'Metadata-Flavor: Google' \\
           http://metadata.google.internal/computeMetadata/v1/instance/machine-type \\
        | awk -F/ '{print $NF}' ;;
    azure)
      curl -sf -m 2 -H 'Metadata: true' \\
           'http://169.254.169.254/metadata/instance/compute/vmSize'\\
'?api-version=2021-02-01&format=text' ;;
  esac
}
INSTANCE_TYPE="$(instance_type || true)"
export INSTANCE_TYPE="${INSTANCE_TYPE:-unknown}"
export VRAM_TOTAL_GB="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits \\
  2>/dev/null | awk '{mib += $1} END {printf "%d", mib / 1024}')"
export VRAM_TOTAL_GB="${VRAM_TOTAL_GB:-0}"
export VLLM_URL="http://127.0.0.1:${VLLM_PORT}"
export ENDPOINT_URL="http://$(hostname -I | awk '{print $1}'):${VLLM_PORT}"
"""

# vLLM in the background, the agent in the foreground: when the agent leaves (drained, or
# told to stop), vLLM goes too; when vLLM dies, the agent's heartbeats say so. vLLM takes its
# API key from VLLM_API_KEY (a secret of the launch); an empty one would mean no key at all.
API_KEY_GUARD = """\
if [ -z "${VLLM_API_KEY:-}" ]; then
  echo "VLLM_API_KEY is not set: vLLM would serve anyone; not starting" >&2
  exit 78
fi
export VLLM_API_KEY
"""

# The source and the names come from the environment, not the script's text: a value is then
# one argument whatever it holds.
SERVE_BY_NAME = 'vllm serve "${MODEL_NAME}"'
"""The Hub repo of the model's name (a model without a weights source)."""
SERVE_WEIGHTS = 'vllm serve "${MODEL_WEIGHTS}" --served-model-name "${MODEL_NAME}"'
"""A repo or a directory of the weights; clients still ask for the catalog's name."""


def _run(serve: str) -> str:
    return """\
set -uo pipefail
""" + API_KEY_GUARD + NODE_FACTS + serve + """ --host 0.0.0.0 --port "${VLLM_PORT}" &
VLLM_PID=$!
trap 'kill -TERM ${VLLM_PID} 2>/dev/null' EXIT
python3 -m agent
"""


@dataclass(frozen=True)
class TaskOptions:
    agent_install: str = "crosslogic"
    vllm_version: str = "0.34.0"
    """Pinned: a release with no known advisory (SKYPILOT_VLLM_VERSION)."""
    disk_size_gb: int = 256


def accelerators(gpu_type: str) -> str:
    """'A10G' → 'A10G:1'; 'A100:4' stays."""
    return gpu_type if ":" in gpu_type else f"{gpu_type}:1"


def weights_plan(spec: LaunchSpec) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(how vLLM is started, the environment that adds, the task's file_mounts) for the
    spec's weights source. Raises UnservableWeights."""
    match spec.weights:
        case None:
            return SERVE_BY_NAME, {}, {}
        case HubWeights(repo=repo):
            return SERVE_WEIGHTS, {"MODEL_WEIGHTS": repo}, {}
        case R2Weights():
            # SkyPilot copies the prefix with the R2 credentials it holds (docs/orchestrator.md).
            # COPY, not MOUNT: SkyPilot mounts only whole buckets, and vLLM reads every shard
            # once at start, which a local disk serves far faster than a FUSE mount.
            mounts = {WEIGHTS_DIR: {"source": str(spec.weights), "mode": "COPY"}}
            return SERVE_WEIGHTS, {"MODEL_WEIGHTS": WEIGHTS_DIR}, mounts
        case FileWeights():
            raise UnservableWeights(
                f"weights source {spec.weights} is a path on this host: only the local cloud "
                "(LAUNCHER=local) serves file:// sources; give the model an hf:// or r2:// "
                "source")


def task_config(spec: LaunchSpec, options: TaskOptions) -> dict[str, Any]:
    """Raises UnservableWeights for a source no SkyPilot machine can reach."""
    serve, weights_env, file_mounts = weights_plan(spec)
    config: dict[str, Any] = {
        "name": spec.cluster_name,
        "resources": {
            "infra": f"{spec.provider}/{spec.region}",
            "accelerators": accelerators(spec.gpu_type),
            "use_spot": spec.spot,
            "disk_size": options.disk_size_gb,
            "labels": {"crosslogic-node-id": str(spec.node_id)},
        },
        "envs": {**spec.env, **weights_env, "VLLM_PORT": str(VLLM_PORT),
                 "VLLM_VERSION": options.vllm_version,
                 "AGENT_INSTALL": options.agent_install,
                 # Without it vLLM ignores the Responses API's `store` (the default), and a
                 # follow-up or retrieval the gateway routes here would find nothing.
                 "VLLM_ENABLE_RESPONSES_API_STORE": "1"},
        "secrets": dict(spec.secrets),
        "setup": _SETUP,
        "run": _run(serve),
    }
    if file_mounts:
        config["file_mounts"] = file_mounts
    return config
