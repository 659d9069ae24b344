"""The SkyPilot task for one GPU node, as the dict `sky.Task.from_yaml_config` takes (the
same shape as a task YAML). Pure: tests validate it against SkyPilot's own schema.

The machine installs vLLM and the agent, starts vLLM on VLLM_PORT, and runs the agent in the
foreground with the environment `launcher.node_env` gives it, plus what only the machine
knows: its instance type (from the cloud's metadata service) and its GPUs' memory (from the
driver). The node's NATS credential, its vLLM API key (VLLM_API_KEY) and the Hugging Face
token go in `secrets`, which SkyPilot keeps out of its listings and logs.

vLLM serves only who presents the node's own key (the gateways derive it: see
services/core/node_keys.py). It reads the key from VLLM_API_KEY, as `vllm serve` does, rather
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

from services.orchestrator.launcher import LaunchSpec

VLLM_PORT = 8000

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

_RUN = """\
set -uo pipefail
""" + API_KEY_GUARD + NODE_FACTS + """\
vllm serve "${MODEL_NAME}" --host 0.0.0.0 --port "${VLLM_PORT}" &
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


def task_config(spec: LaunchSpec, options: TaskOptions) -> dict[str, Any]:
    return {
        "name": spec.cluster_name,
        "resources": {
            "infra": f"{spec.provider}/{spec.region}",
            "accelerators": accelerators(spec.gpu_type),
            "use_spot": spec.spot,
            "disk_size": options.disk_size_gb,
            "labels": {"crosslogic-node-id": str(spec.node_id)},
        },
        "envs": {**spec.env, "VLLM_PORT": str(VLLM_PORT),
                 "VLLM_VERSION": options.vllm_version,
                 "AGENT_INSTALL": options.agent_install},
        "secrets": dict(spec.secrets),
        "setup": _SETUP,
        "run": _RUN,
    }
