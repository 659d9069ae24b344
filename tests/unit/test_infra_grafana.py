"""The Grafana dashboard (infra/grafana/dashboards/*.json) and its provisioning: every panel's
query names only metrics the platform exports (a renamed metric would leave a panel silently
empty), the dashboard covers what an operator looks at, and the provisioning files point where
docker-compose mounts them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_infra_metric_names import ROOT, exported_series, unknown_metrics

GRAFANA = ROOT / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
COMPOSE = ROOT / "infra" / "docker-compose.yml"

# What the dashboard must show, by the metric that shows it.
REQUIRED = {
    "requests": "http_requests_total",
    "latency": "http_request_duration_seconds_bucket",
    "tokens": "tokens_processed_total",
    "nodes by status": "nodes_active_total",
    "heartbeat age": "node_heartbeat_age_seconds",
    "rate-limit rejections": "rate_limit_exceeded_total",
    "billing exports": "billing_exports_total",
    "projection lag": "projection_lag_events",
    "NATS consumer lag": "nats_consumer_pending_messages",
}


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def provisioned_datasources() -> list[dict[str, Any]]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    sources: list[dict[str, Any]] = doc["datasources"]
    return sources


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_queries_exported_metrics(path: Path) -> None:
    dashboard = load(path)
    queries = exprs(dashboard)
    assert queries
    bad = {q: unknown_metrics(q) for q in queries if unknown_metrics(q)}
    assert bad == {}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_template_variables_query_exported_metrics(path: Path) -> None:
    for variable in load(path).get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) \
            else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, query
        assert unknown_metrics(match.group(1)) == set(), query


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_is_well_formed(path: Path) -> None:
    dashboard = load(path)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    uids = {s["uid"] for s in provisioned_datasources()}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"].strip()
        assert panel["datasource"]["uid"] in uids, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids
    # Panels do not overlap.
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_dashboards_cover_what_an_operator_watches() -> None:
    used = set().union(*(re.findall(r"[a-zA-Z_:][\w:]*", q)
                         for path in DASHBOARDS for q in exprs(load(path))))
    missing = {topic: name for topic, name in REQUIRED.items() if name not in used}
    assert missing == {}
    assert set(REQUIRED.values()) <= exported_series()
    latency = " ".join(q for path in DASHBOARDS for q in exprs(load(path))
                       if "http_request_duration_seconds_bucket" in q)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in latency, quantile


def test_provisioning_points_where_compose_mounts_things() -> None:
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"]
                  if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "crosslogic.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./grafana/dashboards"]]
    (source,) = provisioned_datasources()
    host, port = source["url"].removeprefix("http://").split(":")
    prometheus = yaml.safe_load(COMPOSE.read_text())["services"][host]
    assert prometheus["image"].startswith("prom/prometheus")
    assert port == "9090"
