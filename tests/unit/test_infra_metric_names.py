"""The metric names the platform really exports, and the metric names a PromQL expression uses.

Shared by the alert-rule and dashboard tests (tests/unit/test_alerts.py,
tests/unit/test_infra_grafana.py): an alert or a panel on a metric nobody exports never fires
and never draws, and nothing else would say so.

The names come from the source itself (every `Counter(`, `Gauge(`, `Histogram(`, `Summary(`
and custom collector family whose first argument is a string), expanded to the series
prometheus_client exposes for each type.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("services", "agent")

# Series a metric of each type exposes, as suffixes of the name given to the constructor.
_SERIES = {
    "Counter": ("_total", "_created"),
    "CounterMetricFamily": ("_total", "_created"),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "SummaryMetricFamily": ("", "_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}

# Metrics Prometheus itself attaches to every target.
PROMETHEUS_BUILTINS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# Metric names: lower case words joined by underscores (and vLLM's `vllm:` prefix).
_METRIC_NAME = re.compile(r"(?:[a-z]+:)?[a-z][a-z0-9]*(?:_[a-z0-9]+)+")


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _metric_name_dicts(tree: ast.Module) -> list[str]:
    """Keys of the module's dict literals that map metric names to help texts: the names of
    families built in a loop (``GaugeMetricFamily(name, text)`` for each item)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and node.keys and all(
                isinstance(k, ast.Constant) and isinstance(k.value, str)
                and _METRIC_NAME.fullmatch(k.value) for k in node.keys) and all(
                isinstance(v, ast.Constant) and isinstance(v.value, str) for v in node.values):
            names.extend(str(k.value) for k in node.keys if isinstance(k, ast.Constant))
    return names


def declared_metrics(root: Path = ROOT) -> dict[str, str]:
    """{name given to the constructor: metric type} for every metric in the source."""
    found: dict[str, str] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            dynamic: set[str] = set()
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                kind = _callee(node)
                if kind not in _SERIES:
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found[first.value] = kind
                elif isinstance(first, ast.Name):
                    dynamic.add(kind)
            if len(dynamic) == 1:
                kind = dynamic.pop()
                found.update(dict.fromkeys(_metric_name_dicts(tree), kind))
    return found


@cache
def exported_series() -> frozenset[str]:
    """Every series name the platform's /metrics endpoints can show, plus Prometheus's own."""
    names: set[str] = set(PROMETHEUS_BUILTINS)
    for name, kind in declared_metrics().items():
        # prometheus_client strips a counter's `_total` and adds it back on exposition.
        base = name.removesuffix("_total") if kind.startswith("Counter") else name
        names.update(base + suffix for suffix in _SERIES[kind])
    return frozenset(names)


# --------------------------------------------------------------------------- PromQL

_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER_SUFFIX = re.compile(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+|[smhdwy])?\b")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects. Functions, aggregations, keywords, label
    names and Grafana's `$variables` are left out."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    text = _NUMBER_SUFFIX.sub("0", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def unknown_metrics(expr: str) -> set[str]:
    return promql_metric_names(expr) - exported_series()


# --------------------------------------------------------------------------- the helpers' tests


def test_the_source_declares_the_reference_metrics() -> None:
    series = exported_series()
    for name in ("http_requests_total", "http_request_duration_seconds_bucket",
                 "node_heartbeat_age_seconds", "nodes_active_total", "node_health_score",
                 "billing_exports_total", "loadbalancer_latency_seconds_bucket",
                 "tokens_processed_total", "rate_limit_exceeded_total"):
        assert name in series, name
    assert "http_requests_total_total" not in series
    assert "Counter" not in series


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (job) (rate(http_requests_total{status=~"5..", path!="/ready"}[5m]))',
     {"http_requests_total"}),
    ("histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))",
     {"http_request_duration_seconds_bucket"}),
    ("(sum(outbox_relay_leader) or vector(0)) < 1", {"outbox_relay_leader"}),
    ("max(nodes_active_total) == bool 0 and on () max(nodes_draining_total offset 1h) > 1e3",
     {"nodes_active_total", "nodes_draining_total"}),
    ('sum(rate(tokens_processed_total{job=~"$job"}[$__rate_interval])) by (model)',
     {"tokens_processed_total"}),
    ("a_metric / ignoring(x) group_left(y) b_metric", {"a_metric", "b_metric"}),
    ("rate(vllm:prompt_tokens_total[1m])", {"vllm:prompt_tokens_total"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_unknown_metrics_are_reported() -> None:
    assert unknown_metrics("rate(http_requests_totl[5m]) > 0") == {"http_requests_totl"}
    assert unknown_metrics("rate(http_requests_total[5m]) > 0") == set()
