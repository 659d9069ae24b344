"""The edge's ``http_*`` metrics: the shell's request counter and duration histogram, plus
request and response sizes and streams ended early."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.infra.http import HttpMetrics

_SIZE_BUCKETS = (128, 512, 2048, 8192, 32768, 131072, 524288, 2097152, 8388608, 33554432)


class EdgeMetrics:
    """The ``http_*`` metrics: the shell's counter and histogram, plus sizes and streams."""

    def __init__(self, registry: CollectorRegistry, http: HttpMetrics) -> None:
        self.requests = http.requests
        self.duration = http.duration
        self.request_size = Histogram("http_request_size_bytes", "HTTP request body size",
                                      ["method", "path"], buckets=_SIZE_BUCKETS,
                                      registry=registry)
        self.response_size = Histogram(
            "http_response_size_bytes",
            "HTTP response size (body; bytes on the wire for streamed responses)",
            ["method", "path"], buckets=_SIZE_BUCKETS, registry=registry)
        self.stream_aborts = Counter(
            "http_stream_aborts_total",
            "Streamed responses ended early, after their status had gone out",
            ["method", "path", "reason"], registry=registry)
        # `labels()` takes a lock and builds a key on every call; the label sets are bounded
        # (methods, route templates, statuses), so each child is looked up once.
        self._by_route: dict[tuple[str, str], tuple[Histogram, Histogram, Histogram]] = {}
        self._by_status: dict[tuple[str, str, int], Counter] = {}

    def observe(self, method: str, route: str, status: int, seconds: float, bytes_in: int,
                bytes_out: int) -> None:
        children = self._by_route.get((method, route))
        if children is None:
            children = (self.duration.labels(method, route),
                        self.request_size.labels(method, route),
                        self.response_size.labels(method, route))
            self._by_route[(method, route)] = children
        counter = self._by_status.get((method, route, status))
        if counter is None:
            counter = self.requests.labels(method, route, str(status))
            self._by_status[(method, route, status)] = counter
        counter.inc()
        children[0].observe(seconds)
        children[1].observe(bytes_in)
        children[2].observe(bytes_out)
