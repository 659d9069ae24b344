"""The orchestrator's settings, read once from the environment."""

from __future__ import annotations

from services.infra.settings import CoreSettings, Secret


class OrchestratorSettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "orchestrator"
    http_port: int = 8085
    launcher: str = "local"
    """`local` (the local cloud at LOCAL_CLOUD_URL) or `skypilot`."""
    local_cloud_url: str = "http://127.0.0.1:8090"
    cluster_prefix: str = "crosslogic"
    default_provider: str = "aws"
    """The cloud of a deployment region given without one ("us-east-1")."""
    node_nats_url: Secret = Secret("")
    """How nodes reach NATS (tls://… in production); defaults to NATS_URL."""
    nats_node_issuer: Secret = Secret("")
    """`issuer.json` of `crosslogic nats init`: the scoped key that mints each node's own NATS
    credential at launch, and what revokes it when the node ends. Required."""
    node_api_key_secret: Secret = Secret("")
    """What each node's vLLM API key is derived from (HMAC-SHA256 with the node's id; handed
    to the node at launch as VLLM_API_KEY): the gateways' NODE_API_KEY_SECRET. Required."""
    node_credential_ttl_seconds: float = 30 * 86400.0
    """A node's NATS credential expires this long after its launch (then NATS closes its
    connection and the node goes stale and is replaced)."""
    node_heartbeat_interval: float = 15.0
    reconcile_every_seconds: float = 5.0
    cloud_check_every_seconds: float = 30.0
    cloud_lost_max_fraction: float = 0.5
    """A look at the cloud that has more than this fraction of the nodes' machines gone (and
    more than one) is not acted on: most likely the look is wrong, not the fleet."""
    launch_deadline_seconds: float = 900.0
    """A launch not registered by then has failed (cloud provisioning takes minutes)."""
    activation_deadline_seconds: float = 1200.0
    """A node registered this long without becoming active has failed (vLLM downloads and
    loads the weights in that time, or never will)."""
    capacity_cooldown_seconds: float = 300.0
    """A (region, spot) that refused a launch is skipped for this long."""
    launch_retry_seconds: float = 10.0
    """After a launch fails for another reason than capacity, the deployment skips that
    (region, spot) this long, doubling with each failure in a row..."""
    launch_retry_max_seconds: float = 300.0
    """... up to this."""
    unhealthy_grace_seconds: float = 120.0
    """An unhealthy node counts as capacity this long before it is replaced."""
    replace_at_once_fraction: float = 0.25
    """At most this fraction of a deployment's nodes (at least one) is replaced at once for
    silence or sickness; the other suspects wait (they may come back)."""
    drain_timeout_seconds: float = 120.0
    """Longest wait for a draining node to finish before its machine goes down."""
    no_active_alert_after_seconds: float = 60.0
    scale_up_waiting_per_node: float = 2.0
    scale_up_kv_cache: float = 0.85
    scale_down_running_per_node: float = 0.5
    scale_up_delay_seconds: float = 30.0
    scale_down_delay_seconds: float = 300.0
    leader_retry_seconds: float = 2.0
    max_concurrent_launches: int = 16
    skypilot_agent_install: str = "crosslogic"
    """pip requirement that installs the node agent on a SkyPilot machine."""
    skypilot_vllm_version: str = "0.34.0"
    """The vLLM release nodes install (`vllm==…`): one with no known advisory."""
    skypilot_disk_size_gb: int = 256
    hf_token: Secret = Secret("")
    """Handed to nodes as a secret, for gated models."""
    r2_account_id: str = ""
    r2_access_key_id: Secret = Secret("")
    r2_secret_access_key: Secret = Secret("")
    """The reference's R2_*: with LAUNCHER=skypilot, all three set make the orchestrator write
    SkyPilot's R2 credential files (~/.cloudflare/) at start, so SkyPilot can copy models'
    r2:// weights onto nodes (services/orchestrator/r2_credentials.py). None set: SkyPilot
    uses the files the machine has, if any."""
