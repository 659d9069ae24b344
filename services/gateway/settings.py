"""The gateway's settings, read once from the environment (docs/gateway.md lists them)."""

from __future__ import annotations

from typing import Literal

from services.infra.settings import CoreSettings, Secret


class GatewaySettings(CoreSettings, kw_only=True, frozen=True):
    service_name: str = "gateway"
    http_host: str = "0.0.0.0"  # the gateway is the public front door
    http_port: int = 8080
    workers: int = 1
    tls_cert_file: str = ""
    """PEM certificate chain: with TLS_KEY_FILE, the gateway serves HTTPS itself (for setups
    without a load balancer terminating TLS in front of it)."""
    tls_key_file: str = ""
    region: str = "local"
    region_multipliers: str = ""
    """Billing's REGION_MULTIPLIERS (`eu-west-1=1.10,…`): spend budgets price a request as
    billing will, so the two must be set alike."""
    budget_reconcile_seconds: float = 60.0
    """How often one gateway compares the budget counters with billing's records and raises
    those found below them (0: never; services/gateway/budget_reconciler.py)."""
    node_api_key_secret: Secret = Secret("")
    """What each node's vLLM API key is derived from (HMAC-SHA256 with the node's id): the
    orchestrator's NODE_API_KEY_SECRET. Required: the gateway refuses to start without it
    (or with a weak one)."""

    # authentication
    auth_local_cache_seconds: float = 5.0
    auth_redis_cache_seconds: int = 60
    auth_unknown_key_cache_seconds: int = 30
    """How long Redis remembers that a key does not exist (0: not remembered): an unknown key
    costs one PostgreSQL query per this many seconds, however often it is tried."""
    auth_failure_limit: int = 20
    """Failed authentications a client network (an IPv4 address, an IPv6 /64) may make per
    window; past it, its requests without a known-good key get 429 (0: no limit)."""
    auth_failure_window_seconds: float = 60.0
    auth_known_good_seconds: float = 600.0
    """A key that authenticated on this gateway within this long passes a throttled network."""

    # rate limits (0 = no limit at that level)
    environment_requests_per_minute: int = 10_000
    tenant_requests_per_minute: int = 50_000
    global_requests_per_minute: int = 0
    usage_requests_per_minute: int = 60
    """GET /v1/usage per key, apart from inference limits: each runs a PostgreSQL query."""
    usage_max_concurrent: int = 2
    """GET /v1/usage reports one gateway process computes at once (0: no cap); more get 429
    with Retry-After, so reports never hold more of the small PostgreSQL pool that key lookups
    need."""
    usage_statement_timeout_ms: int = 10_000
    """A usage report's own statement_timeout (SET LOCAL), shorter than the pool's
    DB_STATEMENT_TIMEOUT_MS (0: the pool's)."""
    self_service_max_keys: int = 1000
    """Active API keys a tenant may hold for its admin keys to make another (each key made
    has its own budget of calls, so without a ceiling keys could multiply keys)."""
    self_service_max_environments: int = 100
    """Environments a tenant may hold for its admin keys to make another."""
    default_reserved_tokens: int = 1024
    """Tokens reserved per output (prompts * n) of a request that gives no max_tokens, at most
    the model's context length (settled with the real usage)."""
    max_n: int = 8
    """Most outputs (`n`) one chat or completions request may ask for; more is a 400."""
    max_batch_sequences: int = 64
    """Most sequences (prompts x `n`) one completions (or chat) request may make a node run;
    more is a 400 on `prompt` (a batch of prompts is as heavy for a shared node as a big n)."""
    max_embedding_inputs: int = 2048
    """Most items in one embeddings request's `input` (OpenAI's own limit); more is a 400."""
    ratelimit_policy: Literal["local", "allow", "deny"] = "local"
    """When Redis is unreachable: local (per-process limits), allow, or deny."""
    ratelimit_redis_timeout: float = 0.25
    ratelimit_slices: bool = False
    """Spend the request, token and concurrency limits of keys, environments and tenants from
    slices this gateway borrows ahead, as the platform-wide limit always is: most requests then
    make no Redis call, but a burst can find the slack of a limit held by another gateway for
    up to a second (docs/rate-limits.md#slices). Off: every request counted in Redis."""
    redis_cluster: bool = False
    """REDIS_URL names nodes of a Redis Cluster (`redis://host:port[,host:port...]`): the
    limiter routes each request's script to its tenant's primary (docs/rate-limits.md)."""
    concurrency_lease_seconds: float = 120.0

    # load balancing
    lb_strategy: Literal["round_robin", "least_connections", "least_latency", "least_load",
                         "prefix_aware", "kv_aware"] = "round_robin"
    """round_robin, least_connections, least_latency, least_load (vLLM queue and KV cache),
    prefix_aware (a conversation to the node caching its prefix, bounded by load) or
    kv_aware (by the blocks each node's KV events say it caches; docs/routing.md)."""
    lb_prefix_spill: float = 0.25
    """prefix_aware and kv_aware: a node takes a conversation while its load is under
    (1 + this) x the average; past it, the next node in the conversation's order does."""
    kv_index_blocks_per_node: int = 65536
    """kv_aware: the most blocks remembered per node (about 200 bytes each; a million tokens
    at vLLM's block size of 16); the oldest go first."""
    kv_route_max_tokens: int = 8192
    """kv_aware: how far into a prompt its blocks are looked up (bounds the routing cost)."""
    health_score_threshold: int = 50
    node_heartbeat_timeout: float = 60.0
    circuit_error_rate: float = 0.5
    circuit_min_requests: int = 10
    circuit_window_seconds: float = 30.0
    circuit_cooldown_seconds: float = 10.0

    # proxy and HTTP
    upstream_connect_timeout: float = 5.0
    request_timeout: float = 60.0
    stream_chunk_timeout: float = 60.0
    resume_attempts: int = 2
    """How many times a request goes on on another node after its node failed once it had
    started (a stream from where it was cut, a whole answer from the start); 0: never."""
    resume_cutover_seconds: float = 5.0
    """A stream on a node that leaves at a deadline (spot notice, drain) moves to another
    node this long before it."""
    response_owner_ttl_seconds: int = 7 * 86400
    """How long the gateway remembers which node stored a response (Responses API `store`):
    a follow-up or retrieval after that gets 404. vLLM keeps stored responses in a node's
    memory, so a node's life bounds them anyway."""
    max_body_bytes: int = 10 * 1024 * 1024
    cors_origins: str = "*"
    """Comma-separated origins, or *."""
    trusted_proxies: str = "127.0.0.1/32,::1/128"
    """Comma-separated CIDRs whose X-Forwarded-For is believed."""

    # usage
    usage_spool_dir: str = ".state/usage-spool"
    usage_buffer_size: int = 10_000
