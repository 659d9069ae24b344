"""The node's health score, 0-100: a pure function of what the agent observed.

The control plane takes nodes below its threshold (50 by default) out of the load balancer, so
the score says "can this node take more work well": a dead vLLM is 0; a node whose load we
cannot see, or that is queueing or out of KV cache, scores lower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HealthInputs:
    vllm_healthy: bool
    """vLLM's /health answered 200."""
    metrics_ok: bool
    """vLLM's /metrics answered and had the load metrics."""
    num_requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    """Fraction 0..1."""
    gpu_probe_failed: bool = False
    """nvidia-smi exists but did not answer (a node without it is not penalised)."""


METRICS_MISSING_PENALTY = 40
GPU_PROBE_PENALTY = 10
WAITING_PENALTY_PER_REQUEST = 3
WAITING_PENALTY_MAX = 30


def health_score(i: HealthInputs) -> int:
    if not i.vllm_healthy:
        return 0
    score = 100
    waiting, kv = i.num_requests_waiting, i.kv_cache_usage
    if (waiting is not None and not math.isfinite(waiting)) or (
            kv is not None and not math.isfinite(kv)):
        return health_score(HealthInputs(vllm_healthy=True, metrics_ok=False,
                                         gpu_probe_failed=i.gpu_probe_failed))
    if not i.metrics_ok:
        score -= METRICS_MISSING_PENALTY
    if i.kv_cache_usage is not None:
        if i.kv_cache_usage >= 0.98:
            score -= 30
        elif i.kv_cache_usage >= 0.90:
            score -= 15
    if i.num_requests_waiting is not None and i.num_requests_waiting > 0:
        score -= min(WAITING_PENALTY_MAX,
                     int(i.num_requests_waiting * WAITING_PENALTY_PER_REQUEST + 0.999))
    if i.gpu_probe_failed:
        score -= GPU_PROBE_PENALTY
    return max(0, min(100, score))
