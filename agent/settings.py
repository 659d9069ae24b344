"""The node agent's settings, read once from the environment (see docs/agent.md)."""

from __future__ import annotations

import uuid

import msgspec

from schemas.ids import uuid7
from services.infra.settings import Secret

AGENT_VERSION = "0.1.0"

SPOT_PROVIDERS = ("aws", "gcp", "azure")
"""The clouds whose spot notices the agent can read (agent/spot.py)."""

DEFAULT_METADATA_URLS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}


class AgentSettings(msgspec.Struct, kw_only=True, frozen=True):
    nats_url: Secret = Secret("nats://127.0.0.1:4222")
    nats_creds: Secret = Secret("")
    """This node's own NATS credential (`.creds` text), minted by the orchestrator at launch:
    it may speak only of this node, and stops working when the node ends."""
    node_id: uuid.UUID = msgspec.field(default_factory=uuid7)
    """Set by the launcher so the control plane knows which launch registered; new if unset."""
    cluster_name: str = "local"
    provider: str = "local"
    """aws, gcp, azure, or local; any case. Another cloud registers as named, but cannot be
    a spot node: its notices cannot be read."""
    region: str = "local"
    instance_type: str = "local"
    gpu_type: str = "none"
    vram_total_gb: int = 0
    model_name: str = "meta-llama/Llama-3.1-8B-Instruct"
    vllm_url: str = "http://127.0.0.1:8000"
    """Where this agent reaches vLLM (health, metrics)."""
    vllm_kv_events_endpoint: str = ""
    """Where vLLM publishes its KV cache events (its ``--kv-events-config`` endpoint, e.g.
    ``tcp://127.0.0.1:5557``): relayed to the gateways for kv_aware routing. Empty: none."""
    vllm_kv_events_topic: str = ""
    """The topic vLLM publishes them under (``--kv-events-config``'s ``topic``)."""
    endpoint_url: str = ""
    """What the control plane routes to; defaults to vllm_url."""
    spot_instance: bool = False
    heartbeat_interval: float = 15.0
    metadata_url: str = ""
    """Cloud metadata service base address; defaults per provider."""
    spot_poll_interval: float = 5.0
    registration_timeout: float = 5.0
    """How long to wait for the control plane's acknowledgment before publishing again."""
    drain_timeout: float = 120.0
    """Longest wait for in-flight requests when draining (a spot deadline may be shorter)."""
    sigterm_drain_timeout: float = 20.0
    """The same for a drain started by SIGTERM or SIGINT: whoever sends it kills the process
    soon after (Kubernetes' default grace is 30 s), and the agent must have deregistered by
    then (the drain, plus up to 5 s to publish what is left)."""
    drain_grace: float = 2.0
    """Wait after announcing the drain so load balancers stop sending new work first."""
    drain_poll_interval: float = 0.5
    http_timeout: float = 2.0
    log_level: str = "info"
    log_json: bool = True

    def __post_init__(self) -> None:
        provider = self.provider.strip().lower()
        msgspec.structs.force_setattr(self, "provider", provider)
        if self.spot_instance and provider not in SPOT_PROVIDERS:
            # Refused, not run without detection: a spot node that cannot see its notice is
            # reclaimed mid-request with nobody told.
            raise ValueError(
                f"PROVIDER {provider!r} with SPOT_INSTANCE=true: spot notices can only be read "
                f"on {', '.join(SPOT_PROVIDERS)}; fix PROVIDER or set SPOT_INSTANCE=false")

    @property
    def advertised_url(self) -> str:
        return self.endpoint_url or self.vllm_url

    @property
    def metadata_base(self) -> str:
        return self.metadata_url or DEFAULT_METADATA_URLS.get(self.provider, "")
