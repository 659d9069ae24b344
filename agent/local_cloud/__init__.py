"""A cloud on this machine: GPU nodes are a vLLM simulator and a node agent each. The local
launcher drives it in `crosslogic dev` and the tests (see docs/orchestrator.md)."""

from agent.local_cloud.app import CLOUD, create_cloud_app
from agent.local_cloud.cloud import CloudConfig, LocalCloud

__all__ = ["CLOUD", "CloudConfig", "LocalCloud", "create_cloud_app"]
