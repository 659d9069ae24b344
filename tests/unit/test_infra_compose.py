"""infra/docker-compose.yml: valid against the Compose specification's JSON schema (no Docker
engine needed), and consistent with the platform — every command is a real program, every
variable a real setting whose value parses, every port the one Prometheus scrapes.

The schema ships inside the `check-jsonschema` package; it is read from the package's folder
without importing the package (its import needs a newer click than the one installed)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.test_infra_metric_names import ROOT
from tests.unit.test_infra_settings import program_of

INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
PLATFORM_IMAGE = "crosslogic:latest"
CONTROL_PLANE = {"gateway", "admin", "relay", "monitor", "orchestrator", "billing", "notifier"}


def compose_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or spec.origin is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[dev]')")
    path = Path(spec.origin).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR:?error}` / `${VAR}` with nothing set."""
    def one(m: re.Match[str]) -> str:
        op, arg = m.group(2) or "", m.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return "set-by-the-operator"
        return ""
    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def platform_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items()
            if svc.get("image") == PLATFORM_IMAGE}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def test_compose_file_matches_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in validator.iter_errors(compose())]
    assert errors == []


def test_the_schema_check_catches_a_mistake() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    broken = copy.deepcopy(compose())
    broken["services"]["gateway"]["enviroment"] = {"HTTP_PORT": "8080"}
    broken["services"]["redis"]["ports"] = {"6379": 6379}
    errors = {(tuple(e.path), e.validator) for e in validator.iter_errors(broken)}
    assert (("services", "gateway"), "unevaluatedProperties") in errors  # a misspelt key
    assert (("services", "redis", "ports"), "type") in errors


def test_the_stack_has_every_part() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    nats = services["nats"]
    assert nats["image"].startswith("nats:2.1")
    command = nats["command"]
    assert "-js" in command
    store = command[command.index("-sd") + 1]
    assert any(v.split(":")[1] == store and v.split(":")[0] in compose()["volumes"]
               for v in nats["volumes"]), "JetStream's store is on a named volume"
    assert set(platform_services()) >= CONTROL_PLANE
    for name in ("prometheus", "alertmanager", "grafana"):
        assert name in services
    programs = {program_of(svc["command"]).name for svc in platform_services().values()}
    assert {"agent", "simulator"} <= programs, "one simulated node: simulator and agent"


@pytest.mark.parametrize("name", sorted(platform_services()))
def test_every_platform_container_runs_a_real_program_with_real_settings(name: str) -> None:
    service = platform_services()[name]
    program_of(service["command"]).check(env_of(service))


def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    return config


def scrape_problems(doc: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Where the compose services' /metrics and Prometheus's targets disagree. A service with
    METRICS_PORT serves /metrics there only (and a gateway's worker i on METRICS_PORT + i);
    without it, on its HTTP port."""
    jobs = {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
            for job in config["scrape_configs"]}
    services = doc["services"]
    problems = []
    for name in sorted(CONTROL_PLANE):
        env = env_of(services[name])
        metrics_port = int(env.get("METRICS_PORT", "0"))
        if not metrics_port:
            served = {f"{name}:{env['HTTP_PORT']}"}
        else:
            served = {f"{name}:{metrics_port + i}" for i in range(int(env.get("WORKERS", "1")))}
        scraped = jobs.get(f"crosslogic-{name}", set())
        if scraped != served:
            problems.append(f"{name}: /metrics on {sorted(served)}, scraped at {sorted(scraped)}")
    for target in set().union(*jobs.values()):
        host = target.split(":")[0]
        if host != "localhost" and host not in services:
            problems.append(f"{target}: no such service")
    return problems


def test_prometheus_scrapes_each_service_where_it_serves_metrics() -> None:
    assert scrape_problems(compose(), prometheus_config()) == []
    services = compose()["services"]
    for name in CONTROL_PLANE:
        env = env_of(services[name])
        # Off the HTTP ports: the gateway's published port serves no /metrics.
        assert env["METRICS_PORT"] == "9090"
        metrics = {int(env["METRICS_PORT"]) + i for i in range(int(env.get("WORKERS", "1")))}
        assert int(env["HTTP_PORT"]) not in metrics
        published = {str(p).rsplit(":", 2)[-1] for p in services[name].get("ports", [])}
        assert not published & {str(p) for p in metrics}, f"{name} publishes its metrics"
    assert env_of(services["gateway"])["WORKERS"] == "2"  # both workers are targets


def test_the_scrape_check_catches_a_mistake() -> None:
    doc = copy.deepcopy(compose())
    doc["services"]["gateway"]["environment"]["WORKERS"] = "3"
    assert scrape_problems(doc, prometheus_config()) == [
        "gateway: /metrics on ['gateway:9090', 'gateway:9091', 'gateway:9092'], "
        "scraped at ['gateway:9090', 'gateway:9091']"]
    doc = copy.deepcopy(compose())
    del doc["services"]["billing"]["environment"]["METRICS_PORT"]
    assert scrape_problems(doc, prometheus_config()) == [
        "billing: /metrics on ['billing:8083'], scraped at ['billing:9090']"]


def test_one_copy_of_each_stream_on_the_one_nats_server() -> None:
    services = compose()["services"]
    assert [n for n, s in services.items() if str(s.get("image", "")).startswith("nats:")] == [
        "nats"]
    for name in CONTROL_PLANE:
        assert env_of(services[name])["NATS_STREAM_REPLICAS"] == "1"


def test_the_agent_reaches_its_simulator_and_alertmanager_the_notifier() -> None:
    services = compose()["services"]
    agent = next(s for s in platform_services().values()
                 if program_of(s["command"]).name == "agent")
    url = urllib.parse.urlsplit(env_of(agent)["VLLM_URL"])
    simulator = services[url.hostname]
    command = simulator["command"]
    assert command[command.index("--port") + 1] == str(url.port)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    am = yaml.safe_load((INFRA / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in am["receivers"]:
        for hook in receiver["webhook_configs"]:
            url = urllib.parse.urlsplit(hook["url"])
            assert url.hostname == "notifier"
            assert str(url.port) == env_of(services["notifier"])["HTTP_PORT"]


def test_references_resolve() -> None:
    doc = compose()
    services, volumes = doc["services"], doc["volumes"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source}"
            else:
                assert source in volumes, f"{name}: volume {source}"
        build = svc.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file()
    # Services wait for the migrations, and the migrations for PostgreSQL.
    for name in CONTROL_PLANE:
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
    assert program_of(services["migrate"]["command"]).name == "crosslogic migrate"
