"""What the orchestrator needs from a cloud, and what it hands a node.

Two launchers implement `Launcher`: SkyPilot (real clouds) and the local cloud (processes on
this machine, for `crosslogic dev` and the tests). Both start the same agent with the same
environment (`node_env`), so the rest of the platform cannot tell them apart.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from services.domain.catalog.weights import WeightsSource


class ClusterState(enum.StrEnum):
    UP = "up"
    STARTING = "starting"
    """Provisioning or in an abnormal state the cloud may yet resolve."""
    STOPPED = "stopped"


class LaunchError(Exception):
    """The launch did not happen. `capacity`: the cloud had no room (try elsewhere)."""

    def __init__(self, message: str, *, capacity: bool = False) -> None:
        super().__init__(message)
        self.capacity = capacity


@dataclass(frozen=True)
class LaunchSpec:
    node_id: uuid.UUID
    cluster_name: str
    model_name: str
    provider: str
    """aws, gcp, azure, or local."""
    region: str
    gpu_type: str
    spot: bool
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """The agent's environment (node_env)."""
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    """Environment that must not show in the cloud's listings (NATS credentials)."""
    weights: WeightsSource | None = None
    """The model's weights source; None: the Hugging Face Hub repo of `model_name`. Whatever
    the source, vLLM serves the weights as `model_name`."""


class Launcher(Protocol):
    name: str

    async def launch(self, spec: LaunchSpec) -> None:
        """Bring the node's machine up and start vLLM and the agent on it. Raises
        LaunchError. Returns once the machine runs them (registration comes later)."""

    async def down(self, cluster_name: str) -> None:
        """Tear the machine down; a cluster that is already gone is not an error."""

    async def clusters(self) -> dict[str, ClusterState]:
        """The clusters this platform owns, as the cloud sees them now."""

    async def close(self) -> None: ...


def split_region(value: str, default_provider: str) -> tuple[str, str]:
    """'aws/us-east-1' → ('aws', 'us-east-1'); a bare region belongs to the default."""
    provider, sep, region = value.partition("/")
    return (provider.lower(), region) if sep else (default_provider, value)


_NOT_NAME = re.compile(r"[^a-z0-9]+")


def cluster_prefix(prefix: str) -> str:
    """CLUSTER_PREFIX as cluster names carry it: lowercase, digits and dashes, at most 24
    characters ("CrossLogic_Prod" → "crosslogic-prod"). Normalised once, here, for naming and
    for recognising the platform's clusters alike."""
    return _NOT_NAME.sub("-", prefix.lower()).strip("-")[:24].rstrip("-") or "crosslogic"


def owns_cluster(prefix: str, name: str) -> bool:
    """Whether the cluster `name` is one this platform (CLUSTER_PREFIX `prefix`) launched:
    its prefix then the separator, so "crosslogic2-…" is not "crosslogic"'s."""
    return name.startswith(cluster_prefix(prefix) + "-")


def cluster_name(prefix: str, model_name: str, region: str, node_id: uuid.UUID) -> str:
    """`crosslogic-llama-3-1-8b-instruct-us-east-1-1a2b3c4d`: readable in a cloud console,
    unique per node, and valid for every cloud (lowercase, digits, dashes, ≤ 63)."""
    prefix = cluster_prefix(prefix)
    model = _NOT_NAME.sub("-", model_name.rsplit("/", 1)[-1].lower()).strip("-")
    where = _NOT_NAME.sub("-", region.lower()).strip("-")
    suffix = node_id.hex[-8:]
    head = f"{prefix}-{model}-{where}"[:63 - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}"


def node_env(spec_node_id: uuid.UUID, *, cluster: str, model_name: str, provider: str,
             region: str, gpu_type: str, spot: bool, heartbeat_interval: float,
             nats_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """The agent's environment for one node, split into (plain, secret)."""
    env = {
        "NODE_ID": str(spec_node_id),
        "CLUSTER_NAME": cluster,
        "MODEL_NAME": model_name,
        "PROVIDER": provider,
        "REGION": region,
        "GPU_TYPE": gpu_type,
        "SPOT_INSTANCE": "true" if spot else "false",
        "HEARTBEAT_INTERVAL": f"{heartbeat_interval:g}",
    }
    return env, {"NATS_URL": nats_url}
