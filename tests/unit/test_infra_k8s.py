"""infra/k8s/: every manifest valid against the Kubernetes API schemas (kubernetes-validate,
in-process, strict: unknown fields are errors), and the deployment the reference design asks
for — control-plane Deployments with probes, resources, security contexts and disruption
budgets, PostgreSQL, Redis, a 3-node NATS JetStream cluster, TLS ingress, hourly backups —
wired together: every reference resolves, every command is a real program, every variable a
real setting."""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import SERVICES
from tests.unit.test_alerts import needs_promtool, promtool
from tests.unit.test_infra_metric_names import ROOT
from tests.unit.test_infra_settings import program_of, service_settings

K8S = ROOT / "infra" / "k8s"
PROMETHEUS_K8S = ROOT / "infra" / "prometheus" / "prometheus-k8s.yml"
NAMESPACE = "crosslogic-prod"
KUBERNETES_VERSION = "1.30.0"
PLATFORM_IMAGE = "crosslogic"
CONTROL_PLANE = {*SERVICES, "relay"}
# Custom resources (cert-manager's, the Prometheus operator's) have no schema in
# kubernetes-validate; none is used today, and any added must be listed here to be skipped.
CUSTOM_KINDS: frozenset[str] = frozenset()

kubernetes_validate = pytest.importorskip("kubernetes_validate.utils")


@cache
def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every manifest; parsed once (tests copy before they change one)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        spec: dict[str, Any] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    template: dict[str, Any] = doc["spec"]["template"]["spec"]
    return template


def workloads() -> Iterator[dict[str, Any]]:
    for _, doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet", "CronJob"):
            yield doc


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def is_platform(container: dict[str, Any]) -> bool:
    return str(container["image"]).split(":")[0] == PLATFORM_IMAGE


def data_of(kind: str, name: str) -> dict[str, str]:
    doc = objects(kind)[name]
    return {**doc.get("data", {}), **doc.get("stringData", {})}


def resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, values looked up in the manifests' ConfigMaps and Secrets
    (a reference to a key that is not there fails)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data_of("ConfigMap", source["configMapRef"]["name"]))
        else:
            env.update(data_of("Secret", source["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = "from-the-pod"
            continue
        kind, ref = ("Secret", ref["secretKeyRef"]) if "secretKeyRef" in ref \
            else ("ConfigMap", ref["configMapKeyRef"])
        data = data_of(kind, ref["name"])
        assert ref["key"] in data, f"{kind} {ref['name']} has no {ref['key']}"
        env[item["name"]] = data[ref["key"]]
    return env


# --------------------------------------------------------------------------- metrics


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's relabelling of one discovered target (the actions used here: keep, drop,
    replace); None when the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(n, "")
                                                for n in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            replacement = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
        elif action not in ("keep", "drop", "replace"):
            pytest.fail(f"relabel action {action} is not simulated here")
    return labels


def discovered(doc: dict[str, Any]) -> list[dict[str, str]]:
    """What Kubernetes service discovery (`role: pod`) finds in a running pod of `doc`: one
    target per declared container port, at the pod's IP."""
    template = doc["spec"]["template"]
    meta = {"__meta_kubernetes_namespace": doc["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": f"{doc['metadata']['name']}-7d9f-x2x4k",
            "__meta_kubernetes_pod_phase": "Running"}
    for key, value in template["metadata"].get("labels", {}).items():
        meta["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    for key, value in template["metadata"].get("annotations", {}).items():
        meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    return [{**meta, "__address__": f"10.1.2.3:{port['containerPort']}",
             "__meta_kubernetes_pod_container_name": container["name"],
             "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
             "__meta_kubernetes_pod_container_port_number": str(port["containerPort"])}
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])]


def scraped(doc: dict[str, Any]) -> set[tuple[str, int]]:
    """(job, port) of every target infra/prometheus/prometheus-k8s.yml scrapes in `doc`'s
    pods."""
    config = yaml.safe_load(PROMETHEUS_K8S.read_text())
    found = set()
    for job in config["scrape_configs"]:
        for target in discovered(doc):
            labels = relabel({**target, "job": job["job_name"]}, job["relabel_configs"])
            if labels is not None:
                found.add((labels["job"], int(labels["__address__"].rsplit(":", 1)[1])))
    return found


def metrics_problems(deployment: dict[str, Any]) -> list[str]:
    """Where a control-plane Deployment's /metrics is served, declared and scraped disagree:
    the METRICS_PORT its settings get (and METRICS_PORT + i for a gateway's worker i), the
    container ports named for them, the annotation, and the targets Prometheus makes."""
    name = deployment["metadata"]["name"]
    (container,) = pod_spec(deployment)["containers"]
    env = resolved_env(container)
    metrics_port = int(env.get("METRICS_PORT", "0"))
    if not metrics_port:
        return [f"{name}: no METRICS_PORT, so /metrics is on its HTTP port"]
    served = [metrics_port + i for i in range(int(env.get("WORKERS", "1")))]
    problems = []
    if int(env["HTTP_PORT"]) in served:
        problems.append(f"{name}: HTTP_PORT is a metrics port")
    declared = {p["containerPort"]: p["name"] for p in container["ports"]}
    for i, port in enumerate(served):
        want = "metrics" if i == 0 else f"metrics-{i}"
        if declared.get(port) != want:
            problems.append(f"{name}: port {port} is not declared as {want!r}")
    targets = scraped(deployment)
    if targets != {(f"crosslogic-{name}", port) for port in served}:
        problems.append(f"{name}: Prometheus scrapes {sorted(targets)}; /metrics is on "
                        f"{served}")
    annotation = deployment["spec"]["template"]["metadata"]["annotations"]
    if annotation.get("prometheus.io/port") != str(metrics_port):
        problems.append(f"{name}: the prometheus.io/port annotation is not {metrics_port}")
    return problems


@pytest.mark.parametrize("name", sorted(CONTROL_PLANE))
def test_metrics_are_served_declared_and_scraped_off_the_http_port(name: str) -> None:
    deployment = objects("Deployment")[name]
    assert metrics_problems(deployment) == []
    (container,) = pod_spec(deployment)["containers"]
    # The reference design's "Port: 9090 (Metrics)".
    assert resolved_env(container)["METRICS_PORT"] == "9090"
    # Services (the gateway's is the Ingress's backend) carry the HTTP port only.
    ports = objects("Service")[name]["spec"]["ports"]
    assert [p["targetPort"] for p in ports] == ["http"]


def test_the_metrics_check_catches_a_mistake() -> None:
    gateway = copy.deepcopy(objects("Deployment")["gateway"])
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    workers = next(item for item in container["env"] if item["name"] == "WORKERS")
    workers["value"] = "2"  # a second worker, its metrics port neither declared nor scraped
    problems = metrics_problems(gateway)
    assert any("9091" in p and "'metrics-1'" in p for p in problems)
    assert any("Prometheus scrapes" in p for p in problems)
    container["ports"].append({"name": "metrics-1", "containerPort": 9091, "protocol": "TCP"})
    assert metrics_problems(gateway) == []
    container["ports"][1]["name"] = "prometheus"
    assert len(metrics_problems(gateway)) == 2  # not declared as metrics, so not scraped


@needs_promtool
def test_promtool_checks_the_kubernetes_prometheus_config(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery: the rest is checked with a
    static target in its place (the relabelling is simulated above)."""
    config = yaml.safe_load(PROMETHEUS_K8S.read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["namespaces"]["names"] == [NAMESPACE]
        job["static_configs"] = [{"targets": ["pod:9090"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS_K8S.parent / "alerts.yml", tmp_path / "alerts.yml")
    result = promtool("check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(("doc"), [d for _, d in manifests()],
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in manifests()])
def test_manifest_is_valid_for_kubernetes(doc: dict[str, Any]) -> None:
    if doc["kind"] in CUSTOM_KINDS:
        pytest.skip(f"{doc['kind']} is a custom resource: no schema to check it against")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validation_catches_a_mistake() -> None:
    deployment = copy.deepcopy(objects("Deployment")["gateway"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == NAMESPACE
    assert [i["name"] for i in kustomization["images"]] == [PLATFORM_IMAGE]


def test_everything_lives_in_the_namespace() -> None:
    assert list(objects("Namespace")) == [NAMESPACE]
    for name, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{name}: {doc['kind']}"


# --------------------------------------------------------------------------- the control plane


@pytest.mark.parametrize("name", sorted(CONTROL_PLANE))
def test_control_plane_service_is_deployed_for_availability(name: str) -> None:
    deployment = objects("Deployment")[name]
    assert deployment["spec"]["replicas"] >= 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["serviceAccountName"] in objects("ServiceAccount")
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for need in ("requests", "limits"):
        assert set(container["resources"][need]) == {"cpu", "memory"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The port: the service's default, named, probed, scraped and served.
    port = int(resolved_env(container)["HTTP_PORT"])
    settings = service_settings(name) if name in SERVICES else None
    if settings is not None:
        assert port == settings.__struct_defaults__[
            settings.__struct_fields__.index("http_port")]
    assert container["ports"][0] == {"name": "http", "containerPort": port, "protocol": "TCP"}
    assert metrics_problems(deployment) == []
    service = objects("Service")[name]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    budget = objects("PodDisruptionBudget")[name]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    # Migrations before the service starts.
    (migrate,) = spec["initContainers"]
    assert migrate["command"] == ["crosslogic", "migrate"]


def test_every_platform_container_runs_a_real_program_with_real_settings() -> None:
    checked = 0
    for doc in workloads():
        for container in containers(doc):
            if is_platform(container):
                program_of(container["command"]).check(resolved_env(container))
                checked += 1
    assert checked >= 2 * len(CONTROL_PLANE)


def test_references_resolve() -> None:
    for doc in workloads():
        spec = pod_spec(doc)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in objects("ConfigMap")
            elif "secret" in volume:
                assert volume["secret"].get("optional") or \
                    volume["secret"]["secretName"] in objects("Secret")
            elif "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in \
                    objects("PersistentVolumeClaim")
        names = {v["name"] for v in spec.get("volumes", [])} | {
            t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for container in containers(doc):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in names, f"{doc['metadata']['name']}: {mount['name']}"
            if not is_platform(container):
                resolved_env(container)  # its keys exist too


# --------------------------------------------------------------------------- stateful parts


def test_postgres() -> None:
    postgres = objects("StatefulSet")["postgres"]
    (container,) = pod_spec(postgres)["containers"]
    assert container["image"] == "postgres:16"
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    credentials = data_of("Secret", container["envFrom"][0]["secretRef"]["name"])
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(credentials)
    assert objects("Service")[postgres["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    # The services' DATABASE_URL names this user, database and Service.
    url = data_of("Secret", "crosslogic-secrets")["DATABASE_URL"]
    match = re.fullmatch(r"postgresql://(\w+):[^@]+@(\w+):5432/(\w+)", url)
    assert match is not None
    assert match.groups() == (credentials["POSTGRES_USER"], "postgres",
                              credentials["POSTGRES_DB"])
    assert "postgres" in objects("Service")


def test_redis() -> None:
    config = data_of("ConfigMap", "redis-config")["redis.conf"]
    assert "maxmemory 2gb" in config.splitlines()
    assert "maxmemory-policy allkeys-lru" in config.splitlines()
    redis = objects("Deployment")["redis"]
    (container,) = pod_spec(redis)["containers"]
    assert container["image"] == "redis:7"
    assert "/etc/redis/redis.conf" in " ".join(container["command"])
    assert "redis" in objects("Service")


def test_nats_is_a_three_node_jetstream_cluster() -> None:
    nats = objects("StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    headless = objects("Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    config = data_of("ConfigMap", "nats-config")["nats.conf"]
    assert "jetstream {" in config
    routes = re.findall(r"nats://(nats-\d)\.([\w-]+)\.([\w-]+)\.svc\.cluster\.local:6222", config)
    assert routes == [(f"nats-{i}", headless["metadata"]["name"], NAMESPACE) for i in range(3)]
    assert "server_name: $SERVER_NAME" in config  # unique per pod, as JetStream clustering needs
    (container,) = pod_spec(nats)["containers"]
    assert resolved_env(container)["SERVER_NAME"]
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert objects("PodDisruptionBudget")["nats"]["spec"]["maxUnavailable"] == 1
    assert data_of("ConfigMap", "crosslogic-config")["NATS_URL"] == "nats://nats:4222"
    assert "nats" in objects("Service")
    # Each stream the services create is kept on every server, so it outlives one.
    for name in CONTROL_PLANE:
        (service,) = pod_spec(objects("Deployment")[name])["containers"]
        assert resolved_env(service)["NATS_STREAM_REPLICAS"] == str(nats["spec"]["replicas"])


# --------------------------------------------------------------------------- edges


def test_ingress_terminates_tls_with_cert_manager() -> None:
    (ingress,) = objects("Ingress").values()
    assert "cert-manager.io/cluster-issuer" in ingress["metadata"]["annotations"]
    (tls,) = ingress["spec"]["tls"]
    assert tls["hosts"] == ["api.crosslogic.ai"]
    services = objects("Service")
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] == "api.crosslogic.ai"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            assert backend["port"]["name"] in ports
    backends = {p["path"]: p["backend"]["service"]["name"]
                for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert backends["/"] == "gateway"
    assert 'add_post("/webhooks/stripe"' in (ROOT / "services" / "billing" / "app.py").read_text()
    assert backends["/webhooks/stripe"] == "billing"


def test_hourly_backup_to_a_volume() -> None:
    (cron,) = objects("CronJob").values()
    assert cron["spec"]["schedule"] == "0 * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (backup,) = pod_spec(cron)["containers"]
    assert backup["command"][:2] == ["crosslogic", "backup"]
    mounted = {m["mountPath"] for m in backup["volumeMounts"]}
    assert backup["workingDir"] in mounted, "the dump lands on the volume"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(cron)["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims and all(c in objects("PersistentVolumeClaim") for c in claims)


def test_files_are_named_after_what_they_hold() -> None:
    for name in CONTROL_PLANE:
        kinds = {doc["kind"] for f, doc in manifests() if f == f"{name}.yaml"}
        assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}, name
    assert all(Path(K8S / f).exists() for f, _ in manifests())
