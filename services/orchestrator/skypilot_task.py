"""The SkyPilot task for one GPU node, as the dict `sky.Task.from_yaml_config` takes (the
same shape as a task YAML). Pure: tests validate it against SkyPilot's own schema.

The machine installs vLLM and the agent, starts vLLM on VLLM_PORT, and runs the agent in the
foreground with the environment `launcher.node_env` gives it. The agent advertises the
machine's private address; vLLM's port is opened to the control plane (`ports`). NATS
credentials and the Hugging Face token go in `secrets`, which SkyPilot keeps out of its
listings and logs.
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

# vLLM in the background, the agent in the foreground: when the agent leaves (drained, or
# told to stop), vLLM goes too; when vLLM dies, the agent's heartbeats say so.
_RUN = """\
set -uo pipefail
export VLLM_URL="http://127.0.0.1:${VLLM_PORT}"
export ENDPOINT_URL="http://$(hostname -I | awk '{print $1}'):${VLLM_PORT}"
vllm serve "${MODEL_NAME}" --host 0.0.0.0 --port "${VLLM_PORT}" &
VLLM_PID=$!
trap 'kill -TERM ${VLLM_PID} 2>/dev/null' EXIT
python3 -m agent
"""


@dataclass(frozen=True)
class TaskOptions:
    agent_install: str = "crosslogic"
    vllm_version: str = "0.11.0"
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
            "ports": VLLM_PORT,
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
