"""infra/k8s without an ingress controller: the reference's `control-plane-external`
LoadBalancer Service (components/external-lb) and Stripe's webhook on a load balancer of its
own (components/external-lb-stripe-webhook), built as the operator opts in — both listed under
`components:` in infra/k8s/kustomization.yaml, then `kubectl kustomize` — and checked as the
default build is: valid against the Kubernetes schemas, each Service sending to the pods and
port it means (read from the Deployments, not written here), TLS on every port of the load
balancers, the NetworkPolicies opening exactly the load balancers' ports to the internet and
nothing else, and the gateway believing no client's X-Forwarded-For (docs/operations.md,
"Without an ingress controller")."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from services.gateway.app import middleware_config
from services.gateway.real_ip import DEFAULT_TRUSTED_PROXIES, TrustedProxies, client_ip
from services.gateway.settings import GatewaySettings
from tests.unit import test_infra_k8s
from tests.unit.test_infra_k8s import (
    CUSTOM_KINDS,
    K8S,
    KUBERNETES_VERSION,
    NAMESPACE,
    kubernetes_validate,
    kustomization,
    kustomize,
    needs_kubectl,
)
from tests.unit.test_infra_netpol import (
    ALERTMANAGER,
    IMPOSTOR,
    INGRESS_CONTROLLER,
    INTERNET,
    PROMETHEUS,
    Address,
    Pod,
    Source,
    allowed,
    expected_paths,
    nodes_address,
    selects,
)

COMPONENTS = ("components/external-lb", "components/external-lb-stripe-webhook")
# (Service, the Deployment whose pods it reaches).
LOAD_BALANCERS = {"control-plane-external": "gateway", "billing-webhook-external": "billing"}
REMOVED = {("Ingress", "api"), ("NetworkPolicy", "gateway-from-ingress"),
           ("NetworkPolicy", "billing-webhook-from-ingress"),
           ("NetworkPolicy", "acme-solver-from-ingress")}
ADDED = {*(("Service", name) for name in LOAD_BALANCERS),
         ("NetworkPolicy", "gateway-from-load-balancer"),
         ("NetworkPolicy", "billing-webhook-from-load-balancer")}
SSL_CERT = "service.beta.kubernetes.io/aws-load-balancer-ssl-cert"
SSL_PORTS = "service.beta.kubernetes.io/aws-load-balancer-ssl-ports"
# Clients on the internet (and one inside the VPC's range) as the pods see them behind
# externalTrafficPolicy Local.
CLIENTS = (INTERNET, Address("internet-v6", "2001:db8::7"), Address("vpc-client", "10.1.2.3"))

Docs = dict[tuple[str, str], dict[str, Any]]

# The operator's infra/k8s (a real `crosslogic nats init`'s files, the recipe's secrets/): the
# fixture of test_infra_k8s, made once for this module too.
deployable = test_infra_k8s.deployable


def component_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{c}/{p.name}", doc) for c in COMPONENTS for p in sorted((K8S / c).glob("*.yaml"))
            if p.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(p.read_text()) if doc]


def by_id(text: str) -> Docs:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


def build(folder: Path) -> Docs:
    result = kustomize(folder)
    assert result.returncode == 0, result.stderr
    return by_id(result.stdout)


@pytest.fixture(scope="module")
def default(deployable: Path) -> Docs:
    return build(deployable)


@pytest.fixture(scope="module")
def variant(deployable: Path, tmp_path_factory: pytest.TempPathFactory) -> Docs:
    """The operator's infra/k8s (their nats-auth/ and secrets/ in it) with the components
    listed in kustomization.yaml, as docs/operations.md says."""
    folder = tmp_path_factory.mktemp("external-lb") / "k8s"
    shutil.copytree(deployable, folder)
    config = yaml.safe_load((folder / "kustomization.yaml").read_text())
    config["components"] = list(COMPONENTS)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return build(folder)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal variables (the ones these checks need are literal)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def pods_of(docs: Docs) -> dict[str, Pod]:
    found = {}
    for (kind, name), doc in docs.items():
        if kind not in ("Deployment", "StatefulSet", "CronJob"):
            continue
        template = doc["spec"]["template"] if kind != "CronJob" else \
            doc["spec"]["jobTemplate"]["spec"]["template"]
        ports = {str(p.get("name", p["containerPort"])): p["containerPort"]
                 for c in template["spec"]["containers"] for p in c.get("ports", [])}
        found[name] = Pod(name, NAMESPACE, template["metadata"]["labels"], ports)
    return found


# --------------------------------------------------------------------------- without kubectl


@pytest.mark.parametrize("doc", [d for _, d in component_docs()],
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}"
                              for f, d in component_docs()])
def test_component_manifest_is_valid_for_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert doc["metadata"]["namespace"] == NAMESPACE


def test_the_components_are_opt_in() -> None:
    """The default build keeps the Ingress: the components are kustomize Components, which
    add nothing until a kustomization lists them, and infra/k8s/kustomization.yaml does not."""
    assert "components" not in kustomization()
    for component in COMPONENTS:
        config = yaml.safe_load((K8S / component / "kustomization.yaml").read_text())
        assert (config["apiVersion"], config["kind"]) == \
            ("kustomize.config.k8s.io/v1alpha1", "Component")
    # docs/operations.md tells the operator which lines to add, and they are these.
    operations = (K8S.parents[1] / "docs" / "operations.md").read_text()
    assert "## Without an ingress controller" in operations or \
        "### Without an ingress controller" in operations
    assert all(f"- {component}" in operations for component in COMPONENTS)


# --------------------------------------------------------------------------- the build


@needs_kubectl
def test_the_variant_builds_and_is_valid_for_kubernetes(variant: Docs) -> None:
    for doc in variant.values():
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@needs_kubectl
def test_the_variant_changes_only_the_way_in(default: Docs, variant: Docs) -> None:
    """The Ingress and the policies that admitted its controller go, the load balancers and
    theirs come, and the one other change is the gateway's TRUSTED_PROXIES."""
    assert set(default) - set(variant) == REMOVED
    assert set(variant) - set(default) == ADDED
    changed = {key for key in set(default) & set(variant) if default[key] != variant[key]}
    assert changed == {("Deployment", "gateway")}
    before, after = (copy.deepcopy(d[("Deployment", "gateway")]) for d in (default, variant))
    for deployment in (before, after):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        container["env"] = {e["name"]: e for e in container["env"]}
        container["env"].pop("TRUSTED_PROXIES")
    assert before == after


@needs_kubectl
@pytest.mark.parametrize(("name", "deployment"), sorted(LOAD_BALANCERS.items()))
def test_each_load_balancer_reaches_its_pods_http_port_over_tls(variant: Docs, name: str,
                                                               deployment: str) -> None:
    service = variant[("Service", name)]
    workload = variant[("Deployment", deployment)]
    spec = service["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["externalTrafficPolicy"] == "Local"  # the pods and the policies see clients
    # The Deployment's own selector, which its pods' labels carry, and nobody else's pods.
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] == workload["spec"]["selector"]["matchLabels"]
    assert spec["selector"].items() <= labels.items()
    reached = {n for n, pod in pods_of(variant).items()
               if selects({"matchLabels": spec["selector"]}, pod.labels)}
    assert reached == {deployment}
    # Its HTTP port: the one the service listens on and is probed on, not its metrics.
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = spec["ports"]
    assert (port["port"], port.get("protocol", "TCP")) == (443, "TCP")
    target = port["targetPort"]
    number = declared[target] if isinstance(target, str) else target
    assert number in declared.values()
    assert number == int(env_of(container)["HTTP_PORT"])
    assert declared[container["readinessProbe"]["httpGet"]["port"]] == number
    # TLS ends at the load balancer on every port: none is plain text.
    annotations = service["metadata"]["annotations"]
    assert annotations[SSL_CERT].startswith("arn:aws:acm:")
    ssl_ports = {p.strip() for p in annotations[SSL_PORTS].split(",")}
    assert all({str(p["port"]), p.get("name")} & ssl_ports for p in spec["ports"])


@needs_kubectl
def test_the_policies_open_the_load_balancers_ports_and_nothing_more(variant: Docs) -> None:
    """The whole table of who may reach what, as test_infra_netpol works it out: the default's,
    without the ingress controller's paths, and with every outside address let in to the
    gateway's and billing's HTTP ports (their metrics stay closed)."""
    rules = [doc for (kind, _), doc in variant.items() if kind == "NetworkPolicy"]
    pods = pods_of(variant)
    sources: list[Source] = [*pods.values(), INGRESS_CONTROLLER, PROMETHEUS, ALERTMANAGER,
                             IMPOSTOR, *CLIENTS, Address("gpu-node", nodes_address())]
    opened = {(source.name, pod.name, port)
              for pod in pods.values() for port in pod.ports.values()
              for source in sources if source != pod and allowed(source, pod, port, rules)}
    addresses = [s for s in sources if isinstance(s, Address)]
    want = {path for path in expected_paths() if path[0] != INGRESS_CONTROLLER.name}
    want |= {(address.name, service, pods[service].ports["http"])
             for address in addresses for service in LOAD_BALANCERS.values()}
    assert opened == want
    # What each load balancer sends to is in what the policies open to the internet.
    for name, deployment in LOAD_BALANCERS.items():
        (port,) = variant[("Service", name)]["spec"]["ports"]
        target = pods[deployment].ports[port["targetPort"]]
        assert all((c.name, deployment, target) in opened for c in CLIENTS)


@needs_kubectl
def test_the_gateway_believes_no_forwarded_address_behind_the_load_balancer(
        default: Docs, variant: Docs) -> None:
    """A layer-4 load balancer adds no X-Forwarded-For and, with externalTrafficPolicy Local,
    hands over the client's own address: any X-Forwarded-For is the client's own writing, so
    the gateway trusts loopback only (its default), not the Ingress setup's pod network."""
    def trusted(docs: Docs) -> TrustedProxies:
        (container,) = docs[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"]
        settings = msgspec.structs.replace(GatewaySettings(),
                                           trusted_proxies=env_of(container)["TRUSTED_PROXIES"])
        return TrustedProxies(middleware_config(settings).trusted_proxies)

    behind_ingress, behind_lb = trusted(default), trusted(variant)
    (container,) = variant[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"]
    assert set(env_of(container)["TRUSTED_PROXIES"].split(",")) == set(DEFAULT_TRUSTED_PROXIES)
    for client in CLIENTS:
        forged = "203.0.113.9"  # an address the client would like to be
        assert client_ip(client.ip, forged, None, behind_lb) == client.ip
        assert client_ip(client.ip, None, forged, behind_lb) == client.ip
    # The default's setting would have believed the VPC client's header: the change matters.
    assert client_ip("10.1.2.3", "203.0.113.9", None, behind_ingress) == "203.0.113.9"
