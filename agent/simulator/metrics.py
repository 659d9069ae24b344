"""vLLM's own Prometheus metrics (V1 engine names, labels ``model_name`` and ``engine``), in a
registry per app. The scheduler gauges are read at scrape time, so the hot path never touches
them; counters and histograms are bound to their labels once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.simulator.scheduler import Scheduler

FINISHED_REASONS = ("stop", "length", "abort")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it read these alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, model: str, scheduler: Scheduler) -> None:
        names = ["model_name", "engine"]
        labels = (model, "0")
        Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              names, registry=registry).labels(*labels).set_function(
            lambda: scheduler.num_running)
        Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              names, registry=registry).labels(*labels).set_function(
            lambda: scheduler.num_waiting)
        Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              names, registry=registry).labels(*labels).set_function(
            lambda: scheduler.kv_cache_usage)
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.", names,
            registry=registry).labels(*labels)
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            names, registry=registry).labels(*labels)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", names,
            registry=registry).labels(*labels)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", names,
            registry=registry).labels(*labels)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*names, "finished_reason"], registry=registry)
        self.request_success = {reason: success.labels(*labels, reason)
                                for reason in FINISHED_REASONS}
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            names, buckets=TTFT_BUCKETS, registry=registry).labels(*labels)
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            names, buckets=REQUEST_LATENCY_BUCKETS, registry=registry).labels(*labels)


HTTP_EXCLUDED = frozenset({"/metrics", "/health", "/load", "/ping", "/version",
                           "/server_info"})
"""Not counted, as vLLM's prometheus-fastapi-instrumentator is told."""


class HttpMetrics:
    """vLLM's `http_requests_total` (handler, method, status class): every request that got
    past `--api-key` to a route, answered or refused; what the node actually served."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("http_requests_total", "Total number of requests by method, "
                                "status and handler.", ["handler", "method", "status"],
                                registry=registry)
        self._children: dict[tuple[str, str, int], Counter] = {}

    def count(self, handler: str, method: str, status: int) -> None:
        key = (handler, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(handler, method,
                                                               f"{status // 100}xx")
        child.inc()
