"""The alert rules (infra/prometheus/alerts.yml): valid for Prometheus, unit-tested with
promtool (infra/prometheus/alerts_test.yml), on metrics the platform really exports, and each
with what an operator needs to act on it.

promtool comes with Debian's `prometheus` package (.ci/run installs it); the tests that run it
are skipped, saying so, where it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_infra_metric_names import ROOT, exported_series, unknown_metrics

PROMETHEUS = ROOT / "infra" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yml"
ALERTMANAGER = ROOT / "infra" / "alertmanager" / "alertmanager.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")

REFERENCE_ALERTS = {"HighErrorRate", "NodeUnhealthy", "NoActiveNodes", "HighLatency"}
SEVERITIES = {"critical", "warning"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load(ALERTS)["groups"] for rule in group["rules"]
            if "alert" in rule]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alert_rules()]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_prometheus_config() -> None:
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_a_broken_threshold_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: with HighErrorRate's threshold moved they do."""
    broken = ALERTS.read_text().replace(") > 0.05", ") > 0.5", 1)
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0
    assert "HighErrorRate" in result.stdout + result.stderr


def test_the_reference_alerts_are_kept() -> None:
    names = alert_names()
    assert set(names) >= REFERENCE_ALERTS
    assert len(names) == len(set(names)), "alert names are unique"
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert rules["NoActiveNodes"]["labels"]["severity"] == "critical"
    # The reference's histogram_quantile over a bare histogram name is not PromQL that works.
    latency = rules["HighLatency"]["expr"].replace(" ", "")
    assert re.search(r"rate\(http_request_duration_seconds_bucket(\{[^}]*\})?\[5m\]\)", latency)
    assert "le)" in latency


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_is_actionable(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    assert annotations["runbook_url"] == \
        f"docs/TROUBLESHOOTING_RUNBOOK.md#{rule['alert'].lower()}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_uses_exported_metrics(rule: dict[str, Any]) -> None:
    assert unknown_metrics(rule["expr"]) == set()


def test_the_unit_tests_feed_exported_metrics() -> None:
    """Input series under made-up names would make a rule pass that never fires for real."""
    series = exported_series()
    for case in load(ALERT_TESTS)["tests"]:
        for item in case["input_series"]:
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", item["series"])
            assert name is not None and name.group(0) in series, (case["name"], item["series"])


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alert_names())
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_alertmanager_routes_everything_to_the_notifier_bridge() -> None:
    config = load(ALERTMANAGER)
    receivers = {r["name"]: r for r in config["receivers"]}

    def routes(route: dict[str, Any]) -> list[dict[str, Any]]:
        return [route, *(r for child in route.get("routes", []) for r in routes(child))]

    for route in routes(config["route"]):
        receiver = route.get("receiver", config["route"]["receiver"])
        hooks = receivers[receiver]["webhook_configs"]
        assert [h["url"] for h in hooks] == ["http://notifier:8084/alertmanager"]
    # The bridge is the notifier's route, on the notifier's default port.
    notifier_app = (ROOT / "services" / "notifier" / "app.py").read_text()
    assert 'add_post("/alertmanager"' in notifier_app
    assert "http_port: int = 8084" in (ROOT / "services" / "notifier" / "settings.py").read_text()
    # Matchers name real alerts and severities.
    names = set(alert_names())
    matchers = [m for rule in config["inhibit_rules"]
                for m in rule["source_matchers"] + rule["target_matchers"]]
    matchers += [m for route in routes(config["route"]) for m in route.get("matchers", [])]
    for matcher in matchers:
        match = re.fullmatch(r'(\w+)="([^"]*)"', matcher)
        assert match is not None, matcher
        label, value = match.groups()
        if label == "alertname":
            assert value in names, matcher
        elif label == "severity":
            assert value in SEVERITIES, matcher
