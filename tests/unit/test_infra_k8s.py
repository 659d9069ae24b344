"""infra/k8s/: every manifest valid against the Kubernetes API schemas (kubernetes-validate,
in-process, strict: unknown fields are errors), and the deployment the reference design asks
for — control-plane Deployments with probes, resources, security contexts and disruption
budgets, PostgreSQL, Redis, a 3-node NATS JetStream cluster, TLS ingress, hourly backups —
wired together: every reference resolves, every command is a real program, every variable a
real setting."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import SERVICES
from tests.unit.test_infra_metric_names import ROOT
from tests.unit.test_infra_settings import program_of, service_settings

K8S = ROOT / "infra" / "k8s"
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
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
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
