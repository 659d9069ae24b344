"""infra/k8s/networkpolicies.yaml: who may connect to which pod and port, worked out the way
Kubernetes does (a pod selected by any Ingress policy takes only what one of them admits;
peers by pod, namespace and ipBlock; ports by number, name or range) for every pod of the
manifests and every port it declares, and compared with the whole table of what should be
open. The Ingress must send outside traffic only where the policies let the controller in."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.unit.test_infra_k8s import NAMESPACE, objects, pod_spec, workloads

CONTROL_PLANE = ("gateway", "admin", "monitor", "billing", "notifier", "orchestrator", "relay")
# Where the policies expect the cluster's other parts (docs/operations.md#network-policies).
INGRESS_NAMESPACE = "ingress-nginx"
MONITORING_NAMESPACE = "monitoring"
ACME_SOLVER_PORT = 8089


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str] = field(hash=False)
    ports: dict[str, int] = field(default_factory=dict, hash=False)
    """Its containers' ports, by name (unnamed: by their number)."""


@dataclass(frozen=True)
class Address:
    """A client outside the cluster, as the pod sees it."""
    name: str
    ip: str


Source = Pod | Address


def namespace_labels(namespace: str) -> dict[str, str]:
    # Kubernetes labels every namespace with its name (1.21+).
    return {"kubernetes.io/metadata.name": namespace}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_admits(peer: dict[str, Any], source: Source, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if not isinstance(source, Address):
            return False  # pods are selected by labels here, not by their addresses
        ip = ipaddress.ip_address(source.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if not isinstance(source, Pod):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(source.namespace)):
            return False
    elif source.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], source.labels)


def port_admits(rule_ports: list[dict[str, Any]] | None, pod: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for item in rule_ports:
        if item.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in item:
            return True
        wanted = item["port"]
        number = pod.ports.get(wanted) if isinstance(wanted, str) else wanted
        if number is None:
            continue  # a name this pod does not declare
        if number <= port <= item.get("endPort", number):
            return True
    return False


def policies() -> list[dict[str, Any]]:
    return list(objects("NetworkPolicy").values())


def allowed(source: Source, pod: Pod, port: int,
            rules: Iterable[dict[str, Any]] | None = None) -> bool:
    selecting = [p for p in (policies() if rules is None else rules)
                 if p["metadata"]["namespace"] == pod.namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], pod.labels)]
    if not selecting:
        return True  # not isolated
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if (not peers or any(peer_admits(peer, source, policy["metadata"]["namespace"])
                                 for peer in peers)) and \
                    port_admits(rule.get("ports"), pod, port):
                return True
    return False


def pods() -> dict[str, Pod]:
    """A pod of every workload (its template's labels and ports), and the HTTP-01 solver
    cert-manager starts here for the Ingress's certificate."""
    found = {}
    for doc in workloads():
        template = doc["spec"]["template"] if doc["kind"] != "CronJob" else \
            doc["spec"]["jobTemplate"]["spec"]["template"]
        ports = {str(p.get("name", p["containerPort"])): p["containerPort"]
                 for c in pod_spec(doc)["containers"] for p in c.get("ports", [])}
        found[doc["metadata"]["name"]] = Pod(doc["metadata"]["name"], NAMESPACE,
                                             template["metadata"]["labels"], ports)
    found["acme-solver"] = Pod("acme-solver", NAMESPACE,
                               {"acme.cert-manager.io/http01-solver": "true"},
                               {"http": ACME_SOLVER_PORT})
    return found


def nodes_address() -> str:
    (cidr,) = [peer["ipBlock"]["cidr"] for rule in
               objects("NetworkPolicy")["nats-edge-from-nodes"]["spec"]["ingress"]
               for peer in rule["from"]]
    return str(next(ipaddress.ip_network(cidr).hosts()))


INGRESS_CONTROLLER = Pod("ingress-controller", INGRESS_NAMESPACE,
                         {"app.kubernetes.io/name": "ingress-nginx",
                          "app.kubernetes.io/component": "controller"})
PROMETHEUS = Pod("prometheus", MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"})
ALERTMANAGER = Pod("alertmanager", MONITORING_NAMESPACE,
                   {"app.kubernetes.io/name": "alertmanager"})
# Another namespace's pod that wears our labels: podSelector alone must not admit it.
IMPOSTOR = Pod("impostor", "default", {"app.kubernetes.io/name": "gateway",
                                       "app.kubernetes.io/component": "control-plane"})
INTERNET = Address("internet", "198.51.100.7")


def sources() -> list[Source]:
    return [*pods().values(), INGRESS_CONTROLLER, PROMETHEUS, ALERTMANAGER, IMPOSTOR, INTERNET,
            Address("gpu-node", nodes_address())]


def open_paths(rules: Iterable[dict[str, Any]] | None = None) -> set[tuple[str, str, int]]:
    """(source, pod, port) for every declared port a source may connect to."""
    rules = list(policies() if rules is None else rules)
    return {(source.name, pod.name, port)
            for pod in pods().values() for port in pod.ports.values()
            for source in sources() if source != pod and allowed(source, pod, port, rules)}


def expected_paths() -> set[tuple[str, str, int]]:
    ports = {name: pod.ports for name, pod in pods().items()}
    want = {("ingress-controller", "gateway", ports["gateway"]["http"]),
            ("ingress-controller", "billing", ports["billing"]["http"]),
            ("ingress-controller", "acme-solver", ACME_SOLVER_PORT),
            ("alertmanager", "notifier", ports["notifier"]["http"]),
            ("gpu-node", "nats-edge", ports["nats-edge"]["client"]),
            ("postgres-backup", "postgres", ports["postgres"]["postgres"])}
    for service in CONTROL_PLANE:
        want |= {("prometheus", service, port) for name, port in ports[service].items()
                 if name.startswith("metrics")}
        want |= {(service, "postgres", ports["postgres"]["postgres"]),
                 (service, "redis", ports["redis"]["redis"]),
                 (service, "nats", ports["nats"]["client"])}
    for server in ("nats", "nats-edge"):
        want |= {(server, peer, ports[peer]["cluster"]) for peer in ("nats", "nats-edge")
                 if peer != server}
    return want


def test_every_pod_is_isolated_by_default() -> None:
    deny = objects("NetworkPolicy")["default-deny-ingress"]
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    assert deny["spec"]["policyTypes"] == ["Ingress"]


def test_the_policies_open_exactly_what_the_platform_needs() -> None:
    assert open_paths() == expected_paths()
    # Nothing from the internet but the nodes' network to the nodes' TLS port.
    assert not {p for p in open_paths() if p[0] in ("internet", "impostor")}
    assert {p for p in open_paths() if p[1] == "admin" and p[0] != "prometheus"} == set()


def test_the_table_check_catches_a_hole() -> None:
    rules = copy.deepcopy(policies())
    redis = next(p for p in rules if p["metadata"]["name"] == "redis-from-platform")
    redis["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]  # every namespace
    gateway = next(p for p in rules if p["metadata"]["name"] == "gateway-from-ingress")
    gateway["spec"]["ingress"][0]["ports"] = []  # every port
    extra = open_paths(rules) - expected_paths()
    assert ("impostor", "redis", 6379) in extra
    assert ("ingress-controller", "gateway", 9090) in extra


def test_the_ingress_sends_traffic_only_where_the_controller_may_go() -> None:
    """Every path of the Ingress reaches a port the policies open to the ingress controller,
    and the controller may reach nothing else (but cert-manager's HTTP-01 solver)."""
    services = objects("Service")
    all_pods = pods()
    backends = set()
    for ingress in objects("Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = services[backend["name"]]
                (port,) = [p for p in service["spec"]["ports"]
                           if p["name"] == backend["port"]["name"]]
                for pod in all_pods.values():
                    if selects({"matchLabels": service["spec"]["selector"]}, pod.labels):
                        target = port["targetPort"]
                        number = pod.ports[target] if isinstance(target, str) else target
                        backends.add((pod.name, number))
    reachable = {(pod, port) for source, pod, port in open_paths()
                 if source == "ingress-controller"}
    assert backends == reachable - {("acme-solver", ACME_SOLVER_PORT)}
    assert {pod for pod, _ in backends} == {"gateway", "billing"}


def test_only_the_webhook_route_goes_to_billing() -> None:
    paths = {(p["path"], p["pathType"]): p["backend"]["service"]["name"]
             for ingress in objects("Ingress").values() for rule in ingress["spec"]["rules"]
             for p in rule["http"]["paths"]}
    assert {k for k, v in paths.items() if v == "billing"} == {("/webhooks/stripe", "Exact")}
