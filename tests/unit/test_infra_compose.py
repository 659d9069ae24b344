"""infra/docker-compose.yml: valid against the Compose specification's JSON schema (no Docker
engine needed), and consistent with the platform — every command is a real program, every
variable a real setting whose value parses, every port the one Prometheus scrapes, every
service its own NATS identity (and no more of the authority), no password with a default.

The schema ships inside the `check-jsonschema` package; it is read from the package's folder
without importing the package (its import needs a newer click than the one installed)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.cli.main import build_parser
from services.infra.natsauth.authority import NodeIssuer
from services.infra.natsauth.creds import Credentials
from tests.unit.test_infra_metric_names import ROOT
from tests.unit.test_infra_settings import program_of, through_entrypoint

INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
PLATFORM_IMAGE = "crosslogic:latest"
CONTROL_PLANE = {"gateway", "admin", "relay", "monitor", "orchestrator", "billing", "notifier"}
# Each service's NATS identity (services/infra/natsauth/identities.py's Role).
NATS_ROLES = {"gateway": "gateway", "admin": "admin-api", "monitor": "monitor",
              "billing": "billing", "notifier": "notifier", "orchestrator": "orchestrator",
              "relay": "relay", "nats-setup": "provisioner"}
# What the operator must set: no default, none empty (compose's `${VAR:?…}`).
REQUIRED = {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "ADMIN_TOKEN",
            "ALERTMANAGER_TOKEN", "NODE_API_KEY_SECRET"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$")


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


INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR:?error}` / `${VAR}` with nothing set; `$$` is a
    `$` for the container."""
    def one(m: re.Match[str]) -> str:
        op, arg = m.group(2) or "", m.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return "set-by-the-operator"
        return ""
    return INTERPOLATION.sub(one, value).replace("$$", "$")


def interpolations(doc: Any) -> list[tuple[str, str, str]]:
    """(variable, operator, argument) of every `${…}` anywhere in the file."""
    found: list[tuple[str, str, str]] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += interpolations(key) + interpolations(value)
    elif isinstance(doc, list):
        for value in doc:
            found += interpolations(value)
    elif isinstance(doc, str):
        found += [(m.group(1), m.group(2) or "", m.group(3) or "")
                  for m in INTERPOLATION.finditer(doc)]
    return found


def platform_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items()
            if svc.get("image") == PLATFORM_IMAGE}


def programs() -> dict[str, dict[str, Any]]:
    """The platform services that run a program of the platform (not a shell script)."""
    return {name: svc for name, svc in platform_services().items()
            if svc["command"][0] != "sh"}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """What the program sees: the file's environment, interpolated, through the image's
    entrypoint (NATS_CREDS_FILE becomes NATS_CREDS)."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return through_entrypoint({k: interpolate(str(v)) for k, v in env.items()})


def raw_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Its volumes in the long syntax (`source:target[:ro]` strings converted)."""
    found = []
    for mount in service.get("volumes", []):
        if isinstance(mount, str):
            source, target, *mode = mount.split(":")
            found.append({"source": source, "target": target,
                          "read_only": mode == ["ro"], "volume": {}})
        else:
            found.append({"volume": {}, **mount})
    return found


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
    assert any(m["target"] == store and m["source"] in compose()["volumes"]
               for m in mounts(nats)), "JetStream's store is on a named volume"
    assert set(platform_services()) >= CONTROL_PLANE
    for name in ("prometheus", "alertmanager", "grafana"):
        assert name in services
    names = {program_of(svc["command"]).name for svc in programs().values()}
    assert "local cloud" in names, "GPU nodes: the orchestrator launches them on a local cloud"
    assert {"crosslogic migrate", "crosslogic nats"} <= names


@pytest.mark.parametrize("name", sorted(programs()))
def test_every_platform_container_runs_a_real_program_with_real_settings(name: str) -> None:
    service = programs()[name]
    program_of(service["command"]).check(env_of(service))


# --------------------------------------------------------------------------- NATS identities


def nats_mount(service: dict[str, Any], variable: str) -> dict[str, Any] | None:
    """The mount that holds the file `variable` (NATS_CREDS_FILE, …) names."""
    path = raw_env(service).get(variable)
    if path is None:
        return None
    (mount,) = [m for m in mounts(service) if path.startswith(m["target"].rstrip("/") + "/")]
    return mount


def identity_problems(doc: dict[str, Any]) -> list[str]:
    """Where a service's NATS credential is not its own role's, or a container sees more of
    the authority than its part."""
    problems = []
    services = doc["services"]
    for name, service in services.items():
        if service.get("image") != PLATFORM_IMAGE or name == "nats-auth":
            continue
        role = NATS_ROLES.get(name)
        mount = nats_mount(service, "NATS_CREDS_FILE")
        if role is None:
            if mount is not None or "NATS_CREDS" in raw_env(service):
                problems.append(f"{name}: a NATS identity it has no use for")
            continue
        if mount is None:
            problems.append(f"{name}: no NATS_CREDS_FILE")
            continue
        want = {"source": "nats-auth", "subpath": f"roles/{role}", "read_only": True}
        got = {"source": mount["source"], "subpath": mount["volume"].get("subpath"),
               "read_only": mount.get("read_only") is True}
        if got != want:
            problems.append(f"{name}: mounts {got}, not its own role's {want}")
        if not raw_env(service)["NATS_CREDS_FILE"].endswith("/nats.creds"):
            problems.append(f"{name}: NATS_CREDS_FILE is not the role folder's nats.creds")
    for name, service in services.items():
        for mount in mounts(service):
            if mount["source"] == "nats-auth" and name != "nats-auth" and \
                    not mount["volume"].get("subpath"):
                problems.append(f"{name}: mounts the whole authority")
    return problems


def test_every_service_has_nats_creds_of_its_own_role() -> None:
    assert identity_problems(compose()) == []
    services = compose()["services"]
    assert set(NATS_ROLES) <= set(services)
    # The node issuer: the orchestrator's, from its own role folder.
    issuer = {name for name, svc in services.items() if "NATS_NODE_ISSUER_FILE" in raw_env(svc)}
    assert issuer == {"orchestrator"}
    assert nats_mount(services["orchestrator"], "NATS_NODE_ISSUER_FILE") == \
        nats_mount(services["orchestrator"], "NATS_CREDS_FILE")
    # nats-server sees the server configuration only.
    (auth,) = [m for m in mounts(services["nats"]) if m["source"] == "nats-auth"]
    assert auth["volume"]["subpath"] == "server" and auth["read_only"] is True


def test_the_identity_check_catches_a_borrowed_credential() -> None:
    doc = copy.deepcopy(compose())
    billing = mounts(doc["services"]["billing"])
    doc["services"]["billing"]["volumes"] = [
        {**m, "volume": {"subpath": "roles/gateway"}} if m["source"] == "nats-auth" else m
        for m in billing]
    doc["services"]["monitor"]["volumes"] = [
        {"type": "volume", "source": "nats-auth", "target": "/run/crosslogic/nats"}]
    problems = identity_problems(doc)
    assert any(p.startswith("billing: mounts") and "roles/gateway" in p for p in problems)
    assert "monitor: mounts the whole authority" in problems


def run_nats_auth(folder: Path) -> subprocess.CompletedProcess[str]:
    """The `nats-auth` service's script, run here on `folder` instead of its volume."""
    service = compose()["services"]["nats-auth"]
    (volume,) = mounts(service)
    script = interpolate(service["command"][2]).replace(volume["target"], str(folder))
    # `crosslogic` is the console script beside this interpreter.
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(["sh", "-ec", script], env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=60, check=False)


def test_nats_auth_lays_out_each_services_own_credential(tmp_path: Path) -> None:
    """The script, for real: `crosslogic nats init` on an empty volume, then one folder per
    identity holding that identity's credential; a second run keeps the authority (a new
    one would lock every running service out)."""
    auth = tmp_path / "nats-auth"
    auth.mkdir()
    first = run_nats_auth(auth)
    assert first.returncode == 0, first.stderr
    for role in NATS_ROLES.values():
        creds = Credentials.parse((auth / "roles" / role / "nats.creds").read_text())
        assert creds.role == role
    assert {p.name for p in (auth / "roles").iterdir()} == set(NATS_ROLES.values())
    NodeIssuer.from_json((auth / "roles" / "orchestrator" / "issuer.json").read_text())
    assert (auth / "server" / "server.conf").read_text() == (auth / "server.conf").read_text()
    assert oct((auth / "roles" / "gateway").stat().st_mode & 0o777) == "0o700"
    operator = (auth / "server.conf").read_text()
    again = run_nats_auth(auth)
    assert again.returncode == 0, again.stderr
    assert (auth / "server.conf").read_text() == operator


def test_nats_keeps_account_jwts_on_its_volume() -> None:
    """The resolver directory the script gives `crosslogic nats init` is on nats-data, and
    nats-server reads the server.conf the script lays out."""
    services = compose()["services"]
    script = services["nats-auth"]["command"][2]
    init = re.search(r"crosslogic (nats init .*)$", script, flags=re.MULTILINE)
    assert init is not None
    args = build_parser().parse_args(shlex.split(interpolate(init.group(1))))
    nats = services["nats"]
    (data,) = [m for m in mounts(nats) if m["source"] == "nats-data"]
    assert args.resolver_dir.startswith(data["target"] + "/")
    config = nats["command"][nats["command"].index("-c") + 1]
    (auth,) = [m for m in mounts(nats) if m["source"] == "nats-auth"]
    assert config == f"{auth['target']}/server.conf"
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"


# --------------------------------------------------------------------------- passwords


def password_problems(doc: dict[str, Any]) -> list[str]:
    """Secrets with a default, required ones that may be left out, Redis without a password,
    URLs without theirs."""
    problems = []
    for variable, op, arg in interpolations(doc):
        if SECRET_NAME.search(variable) and op in (":-", "-") and arg:
            problems.append(f"{variable} has a default")
        if variable in REQUIRED and op != ":?":
            problems.append(f"{variable} is not required (${{{variable}:?…}})")
    for name, service in doc["services"].items():
        for key, value in raw_env(service).items():
            if SECRET_NAME.search(key) and value and not INTERPOLATION.search(value):
                problems.append(f"{name}: {key} is written in the file")
            if key == "REDIS_URL" and "${REDIS_PASSWORD:?" not in value:
                problems.append(f"{name}: REDIS_URL without the password")
            if key == "DATABASE_URL" and "${POSTGRES_PASSWORD:?" not in value:
                problems.append(f"{name}: DATABASE_URL without the password")
    redis = doc["services"]["redis"]
    if "--requirepass \"$$REDIS_PASSWORD\"" not in " ".join(redis["command"]):
        problems.append("redis: no --requirepass")
    return problems


def test_compose_has_no_default_password() -> None:
    assert password_problems(compose()) == []
    assert {v for v, _, _ in interpolations(compose())} >= REQUIRED
    services = compose()["services"]
    assert "REDIS_PASSWORD" in raw_env(services["redis"])["REDISCLI_AUTH"]  # its health check
    assert "GRAFANA_ADMIN_PASSWORD" in raw_env(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD"]


def test_the_password_check_catches_a_default() -> None:
    doc = copy.deepcopy(compose())
    doc["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] = \
        "${GRAFANA_ADMIN_PASSWORD:-admin}"
    doc["services"]["gateway"]["environment"]["REDIS_URL"] = "redis://redis:6379/0"
    doc["services"]["redis"]["command"] = ["redis-server"]
    doc["services"]["admin"]["environment"]["ADMIN_TOKEN"] = "change-me-change-me"
    assert set(password_problems(doc)) == {
        "GRAFANA_ADMIN_PASSWORD has a default",
        "GRAFANA_ADMIN_PASSWORD is not required (${GRAFANA_ADMIN_PASSWORD:?…})",
        "gateway: REDIS_URL without the password", "redis: no --requirepass",
        "admin: ADMIN_TOKEN is written in the file"}


def test_env_example_documents_every_variable_without_a_value() -> None:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    documented = dict(line.split("=", 1) for line in lines)
    assert set(documented) == {v for v, _, _ in interpolations(compose())}
    assert all(value == "" for value in documented.values()), "no real value in the example"
    assert ".env" in (INFRA / ".gitignore").read_text().splitlines()


def test_alertmanager_sends_the_notifiers_token() -> None:
    """The notifier wants ALERTMANAGER_TOKEN (it listens beyond loopback); Alertmanager reads
    it from the compose secret made of the same variable."""
    doc = compose()
    services = doc["services"]
    assert raw_env(services["notifier"])["ALERTMANAGER_TOKEN"].startswith(
        "${ALERTMANAGER_TOKEN:?")
    (secret,) = services["alertmanager"]["secrets"]
    assert doc["secrets"][secret] == {"environment": "ALERTMANAGER_TOKEN"}
    am = yaml.safe_load((INFRA / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in am["receivers"]:
        for hook in receiver["webhook_configs"]:
            authorization = hook["http_config"]["authorization"]
            assert authorization == {"type": "Bearer",
                                     "credentials_file": f"/run/secrets/{secret}"}


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


def test_the_orchestrator_launches_on_the_cloud_and_alertmanager_reaches_the_notifier() -> None:
    services = compose()["services"]
    orchestrator = env_of(services["orchestrator"])
    assert orchestrator["LAUNCHER"] == "local"
    url = urllib.parse.urlsplit(orchestrator["LOCAL_CLOUD_URL"])
    cloud = services[str(url.hostname)]
    command = cloud["command"]
    assert program_of(command).name == "local cloud"
    assert command[command.index("--port") + 1] == str(url.port)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert services["orchestrator"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    # Simulators listen on the cloud container's name: the endpoints their agents register
    # are reachable from the gateway's and the monitor's containers.
    simulator = shlex.split(command[command.index("--simulator-args") + 1])
    assert simulator[simulator.index("--host") + 1] == url.hostname
    # The cloud holds no credential: each launch brings the node's own.
    assert not set(raw_env(cloud)) and not mounts(cloud)
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
        for mount in mounts(svc):
            source = mount["source"]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source}"
            else:
                assert source in volumes, f"{name}: volume {source}"
        for secret in svc.get("secrets", []):
            assert secret in doc["secrets"], f"{name}: secret {secret}"
        build = svc.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file()
    # Services wait for the migrations and the streams; those for PostgreSQL and NATS.
    for name in CONTROL_PLANE:
        for step in ("migrate", "nats-setup"):
            assert services[name]["depends_on"][step]["condition"] == \
                "service_completed_successfully"
    assert program_of(services["migrate"]["command"]).name == "crosslogic migrate"
    assert services["nats-setup"]["command"] == ["crosslogic", "nats", "setup"]
