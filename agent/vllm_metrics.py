"""Reading vLLM's Prometheus /metrics: the load figures a heartbeat carries. Pure parsing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_LEGACY = "vllm:gpu_cache_usage_perc"  # vLLM < 0.10 (V0 engine) name
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"


@dataclass(frozen=True)
class VllmLoad:
    running: float
    waiting: float
    kv_cache_usage: float | None
    generation_tokens_total: float | None
    prompt_tokens_total: float | None
    model: str | None = None
    """The `model_name` label read (None: every series, or none carried the label)."""


class MetricsError(ValueError):
    """The text is not Prometheus exposition, or lacks the load metrics."""


def parse_vllm_metrics(text: str, model_name: str | None = None) -> VllmLoad:
    """Sum each metric over its series: those of `model_name` if vLLM labels it so, else,
    when vLLM serves exactly one model (under another name: `--served-model-name`), that
    model's; with no `model_name`, every model's. Series without the label always count."""
    per_model: dict[str | None, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                # Counters' samples are named with _total; gauges as the family.
                sums = per_model.setdefault(sample.labels.get("model_name"), {})
                sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
    except (ValueError, TypeError) as exc:
        raise MetricsError(f"unparseable metrics: {exc}") from exc
    served = sorted(m for m in per_model if m is not None)
    if model_name is None:
        chosen, read = None, served
    elif model_name in served or not served:
        chosen, read = (model_name if served else None), [model_name]
    elif len(served) == 1:
        chosen, read = served[0], served
    else:
        raise MetricsError(f"no metrics for model {model_name!r}; vLLM serves {served}")
    sums = dict(per_model.get(None, {}))
    for model in read:
        for name, value in per_model.get(model, {}).items():
            sums[name] = sums.get(name, 0.0) + value
    if RUNNING not in sums or WAITING not in sums:
        raise MetricsError(f"{RUNNING} or {WAITING} missing")
    if not (math.isfinite(sums[RUNNING]) and math.isfinite(sums[WAITING])):
        # NaN and ±Inf are valid exposition, but no load a score or a balancer can use.
        raise MetricsError(f"{RUNNING} or {WAITING} not a finite number")
    kv = sums.get(KV_CACHE, sums.get(KV_CACHE_LEGACY))
    return VllmLoad(running=sums[RUNNING], waiting=sums[WAITING], kv_cache_usage=_finite(kv),
                    generation_tokens_total=_finite(sums.get(GENERATION_TOKENS)),
                    prompt_tokens_total=_finite(sums.get(PROMPT_TOKENS)), model=chosen)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def tokens_per_second(previous: float | None, current: float | None,
                      seconds: float) -> float | None:
    """Generation rate between two scrapes; None when it cannot be known (first scrape,
    missing counter, or a counter reset when vLLM restarted)."""
    if previous is None or current is None or seconds <= 0 or current < previous:
        return None
    return (current - previous) / seconds
