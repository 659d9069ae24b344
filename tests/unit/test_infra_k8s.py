"""infra/k8s/: every manifest valid against the Kubernetes API schemas (kubernetes-validate,
in-process, strict: unknown fields are errors), and the deployment the reference design asks
for — control-plane Deployments with probes, resources, security contexts and disruption
budgets, PostgreSQL, Redis, a 3-node NATS JetStream cluster with JWT authentication and TLS
servers for the GPU nodes, TLS ingress, hourly backups — wired together: every reference
resolves (Secrets made by kustomize's secretGenerator and by cert-manager included), every
command is a real program, every variable a real setting, every service its own NATS
identity. No Secret is committed: each is generated from files the operator makes, and the
commands docs/operations.md gives for them are run here (their output stands for the Secrets'
values in every check). NetworkPolicies: tests/unit/test_infra_netpol.py; the NATS servers'
configurations run: tests/unit/test_infra_nats.py."""

from __future__ import annotations

import base64
import copy
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.main import SERVICES, build_parser
from services.infra.natsauth.creds import Credentials
from services.infra.natsauth.identities import Role
from services.infra.settings import placeholder_password, weak_token_reason
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
# kubernetes-validate: listed here to be skipped there, and checked by a test of their own.
CUSTOM_KINDS: frozenset[str] = frozenset({"Certificate", "Issuer"})
# Each control-plane service's NATS identity (services/infra/natsauth/identities.py's Role).
NATS_ROLES = {"gateway": "gateway", "admin": "admin-api", "monitor": "monitor",
              "billing": "billing", "notifier": "notifier", "orchestrator": "orchestrator",
              "relay": "relay"}
# The keys cert-manager writes into a Certificate's Secret.
CERTIFICATE_KEYS = ("tls.crt", "tls.key", "ca.crt")
# The ClusterIssuer the operator provides (docs/operations.md#gpu-nodes-reach-nats-over-tls);
# every other issuer is in the manifests.
EXTERNAL_ISSUERS = {"letsencrypt-dns01"}
OPERATIONS = ROOT / "docs" / "operations.md"
# The operator's commands that make infra/k8s/secrets/ (docs/operations.md#kubernetes).
SECRETS_RECIPE_MARK = "mkdir infra/k8s/secrets"
# What the operator may leave empty there (a feature off), and what must be a strong secret.
OPTIONAL_SECRETS = {"HF_TOKEN", "SMTP_PASSWORD", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET",
                    # The backup's storage: the operator's to fill in (the job fails until then).
                    "BACKUP_S3_URL", "BACKUP_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY"}
SHARED_SECRETS = {"ADMIN_TOKEN", "ALERTMANAGER_TOKEN", "NODE_API_KEY_SECRET",
                  "NATS_ROUTE_PASSWORD", "POSTGRES_PASSWORD", "REDIS_PASSWORD"}

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


@cache
def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return doc


def generator_keys(generator: dict[str, Any]) -> dict[str, str]:
    """{key: file} of a secretGenerator: kustomize names a key after its file unless the
    entry says `key=file`."""
    keys = {}
    for entry in generator.get("files", []):
        key, sep, path = str(entry).partition("=")
        keys[key if sep else Path(key).name] = path if sep else key
    return keys


def generator_sources(generator: dict[str, Any]) -> list[str]:
    """Every file a secretGenerator entry reads (relative to infra/k8s)."""
    return [*generator_keys(generator).values(), *generator.get("envs", [])]


def env_file(text: str) -> dict[str, str]:
    """A kustomize env file (`KEY=VALUE` lines; blank lines and # comments skipped)."""
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {key!r}"
            pairs[key.strip()] = value
    return pairs


def secrets_recipe() -> str:
    """The shell commands docs/operations.md gives the operator to make infra/k8s/secrets/."""
    blocks = re.findall(r"^([ \t]*)```sh\n(.*?)^\1```", OPERATIONS.read_text(),
                        re.MULTILINE | re.DOTALL)
    (recipe,) = [body for _, body in blocks if SECRETS_RECIPE_MARK in body]
    return textwrap.dedent(recipe)


def run_secrets_recipe(root: Path) -> subprocess.CompletedProcess[str]:
    """The recipe, run as the operator runs it: from the repository's root (here `root`)."""
    (root / "infra" / "k8s").mkdir(parents=True, exist_ok=True)
    return subprocess.run(["sh", "-c", secrets_recipe()], cwd=root, capture_output=True,
                          text=True, timeout=60, check=False)


@cache
def operator_files() -> dict[str, str]:
    """{path under infra/k8s: content} of what the recipe makes, run once in a scratch folder:
    its values stand for the generated Secrets' in every check here."""
    with tempfile.TemporaryDirectory() as scratch:
        result = run_secrets_recipe(Path(scratch))
        assert result.returncode == 0, result.stderr
        k8s = Path(scratch) / "infra" / "k8s"
        return {str(f.relative_to(k8s)): f.read_text()
                for f in sorted(k8s.rglob("*")) if f.is_file()}


def generated_data(generator: dict[str, Any]) -> dict[str, str]:
    """The keys and values of a generated Secret: literals as written; env files as the
    recipe makes them; files of `crosslogic nats init` as a stand-in."""
    data = dict.fromkeys(generator_keys(generator), "generated")
    for literal in generator.get("literals", []):
        key, _, value = str(literal).partition("=")
        data[key] = value
    for path in generator.get("envs", []):
        assert path in operator_files(), f"docs/operations.md makes no {path}"
        data.update(env_file(operator_files()[path]))
    return data


@cache
def provided_secrets() -> tuple[dict[str, Any], ...]:
    """Secrets the manifests do not hold but the apply makes: kustomize's secretGenerator
    (from `crosslogic nats init`'s files and the operator's secrets/) and cert-manager (each
    Certificate's secretName). Their values stand in for what the files and certificates
    will hold."""
    made = [{"kind": "Secret", "metadata": {"name": g["name"], "namespace": NAMESPACE},
             "stringData": generated_data(g)}
            for g in kustomization().get("secretGenerator", [])]
    made += [{"kind": "Secret", "metadata": {"name": doc["spec"]["secretName"],
                                              "namespace": NAMESPACE},
              "stringData": dict.fromkeys(CERTIFICATE_KEYS, "issued")}
             for _, doc in manifests() if doc["kind"] == "Certificate"]
    return tuple(made)


def objects(kind: str) -> dict[str, dict[str, Any]]:
    found = {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}
    if kind == "Secret":
        for doc in provided_secrets():
            assert doc["metadata"]["name"] not in found, "a Secret made twice"
            found[doc["metadata"]["name"]] = doc
    return found


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


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(NAME)` in an env value: a variable defined before it, else left as is;
    `$$` is a `$`."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def resolved_env(container: dict[str, Any],
                 fields: Mapping[str, str] | None = None) -> dict[str, str]:
    """The container's environment, values looked up in the manifests' ConfigMaps and Secrets
    (a reference to a key that is not there fails) and `$(NAME)`s expanded as Kubernetes
    does; a fieldRef's value from `fields` (by its path), else a stand-in."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data_of("ConfigMap", source["configMapRef"]["name"]))
        else:
            env.update(data_of("Secret", source["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = (fields or {}).get(ref["fieldRef"]["fieldPath"], "from-the-pod")
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
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization()["resources"]) == sorted(files)
    assert kustomization()["namespace"] == NAMESPACE
    assert [i["name"] for i in kustomization()["images"]] == [PLATFORM_IMAGE]


def test_the_nats_secrets_are_made_from_the_authority_files() -> None:
    """`crosslogic nats init`'s layout (server.conf, issuer.json, creds/<role>.creds) copied
    into infra/k8s/nats-auth/ (git-ignored): the service identities and the provisioner,
    never the admin's or the observer's."""
    generators = {g["name"]: generator_keys(g) for g in kustomization()["secretGenerator"]}
    assert generators["nats-server-auth"] == {"server.conf": "nats-auth/server.conf"}
    assert generators["nats-node-issuer"] == {"issuer.json": "nats-auth/issuer.json"}
    roles = {*NATS_ROLES.values(), Role.PROVISIONER.value}
    assert generators["nats-credentials"] == {
        f"{role}.creds": f"nats-auth/creds/{role}.creds" for role in roles}
    nats_auth = {n for n, keys in generators.items()
                 if any(f.startswith("nats-auth/") for f in keys.values())}
    assert nats_auth == {"nats-server-auth", "nats-node-issuer", "nats-credentials"}


# The Secrets the manifests use, made by kustomize from the operator's secrets/ (the recipe
# of docs/operations.md), with the keys the workloads read.
OPERATOR_SECRETS = {
    "crosslogic-secrets": {"DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "ALERTMANAGER_TOKEN",
                           "NODE_API_KEY_SECRET", "HF_TOKEN", "SMTP_PASSWORD"},
    "crosslogic-stripe": {"STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"},
    "postgres-credentials": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    "redis-credentials": {"REDIS_PASSWORD"},
    "nats-routes-auth": {"NATS_ROUTE_PASSWORD"},
}


def test_no_secret_is_committed() -> None:
    """Every Secret is generated at the apply from files the operator makes in git-ignored
    folders (or by cert-manager): the manifests carry no Secret, no placeholder a cluster
    could run with, and `kubectl apply -k` fails until the files exist (the kubectl tests
    below)."""
    assert [name for name, doc in manifests() if doc["kind"] == "Secret"] == []
    for path in K8S.glob("*.yaml"):
        folded = re.sub(r"[^a-z]", "", path.read_text().lower())
        assert "replaceme" not in folded and "changeme" not in folded, path.name
    generators = {g["name"]: g for g in kustomization()["secretGenerator"]}
    for name, keys in OPERATOR_SECRETS.items():
        assert set(generated_data(generators[name])) == keys, name
        assert all(s.startswith("secrets/") for s in generator_sources(generators[name]))
    ignored = (ROOT / "infra" / ".gitignore").read_text().splitlines()
    for generator in generators.values():
        for source in generator_sources(generator):
            assert f"k8s/{source.split('/')[0]}/" in ignored, f"{source} is not git-ignored"
    # Only literals that are no secret.
    literals = {str(item).partition("=")[0] for g in generators.values()
                for item in g.get("literals", [])}
    assert literals <= {"POSTGRES_USER", "POSTGRES_DB"}
    # Whatever a workload needs from a Secret is one the apply makes (the orchestrator's
    # optional skypilot-config is the operator's own, made by hand if wanted).
    needed = set()
    for doc in workloads():
        needed |= {v["secret"]["secretName"] for v in pod_spec(doc).get("volumes", [])
                   if "secret" in v and not v["secret"].get("optional")}
        for container in containers(doc):
            needed |= {s["secretRef"]["name"] for s in container.get("envFrom", [])
                       if "secretRef" in s and not s["secretRef"].get("optional")}
            needed |= {i["valueFrom"]["secretKeyRef"]["name"] for i in container.get("env", [])
                       if "secretKeyRef" in i.get("valueFrom", {})
                       and not i["valueFrom"]["secretKeyRef"].get("optional")}
    assert needed <= {d["metadata"]["name"] for d in provided_secrets()}


def test_the_secrets_recipe_makes_strong_matching_secrets(tmp_path: Path) -> None:
    """docs/operations.md's commands, run: private files, every password and token strong and
    its own, the URLs carrying the passwords PostgreSQL and Redis are started with; and run
    again they change nothing (PostgreSQL keeps the password of its first start)."""
    result = run_secrets_recipe(tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "infra" / "k8s" / "secrets"
    assert folder.stat().st_mode & 0o777 == 0o700
    files = {f.name: f for f in folder.iterdir()}
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files.values())
    env: dict[str, str] = {}
    for f in files.values():
        pairs = env_file(f.read_text())
        assert not set(pairs) & set(env), f"{f.name}: a key made twice"
        env.update(pairs)
    generators = kustomization()["secretGenerator"]
    assert {f"secrets/{name}" for name in files} == {
        s for g in generators for s in generator_sources(g) if s.startswith("secrets/")}
    assert {k for k, v in env.items() if not v} == OPTIONAL_SECRETS
    for name in SHARED_SECRETS:
        assert weak_token_reason(env[name]) is None, name
        assert re.fullmatch(r"[0-9a-f]+", env[name]), f"{name}: safe in a URL and in nats.conf"
    assert len({env[name] for name in SHARED_SECRETS}) == len(SHARED_SECRETS)
    database = urllib.parse.urlsplit(env["DATABASE_URL"])
    assert database.password == env["POSTGRES_PASSWORD"]
    assert (database.username, database.path) == ("crosslogic", "/crosslogic")
    redis = urllib.parse.urlsplit(env["REDIS_URL"])
    assert redis.password == env["REDIS_PASSWORD"]
    assert not placeholder_password(env["DATABASE_URL"])
    assert not placeholder_password(env["REDIS_URL"])
    before = {name: f.read_text() for name, f in files.items()}
    again = run_secrets_recipe(tmp_path)
    assert again.returncode != 0
    assert {name: f.read_text() for name, f in files.items()} == before


KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None,
                                   reason="kubectl is not installed (its kustomize builds)")


def kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    return subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture(scope="module")
def deployable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """infra/k8s as an operator has it before the apply (operations.md's steps): the files of
    a real `crosslogic nats init` copied into nats-auth/, secrets/ made by the recipe."""
    root = tmp_path_factory.mktemp("repo")
    folder = root / "infra" / "k8s"
    shutil.copytree(K8S, folder, ignore=shutil.ignore_patterns("nats-auth", "secrets"))
    init = subprocess.run([sys.executable, "-m", "services.cli", "nats", "init",
                           str(root / "authority")], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)
    assert init.returncode == 0, init.stderr
    for path in {p for g in kustomization()["secretGenerator"]
                 for p in generator_keys(g).values()}:
        source = root / "authority" / Path(path).relative_to("nats-auth")
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / path)
    made = run_secrets_recipe(root)
    assert made.returncode == 0, made.stderr
    return folder


@needs_kubectl
def test_kustomize_builds_with_the_operators_files(deployable: Path) -> None:
    """`kubectl kustomize` (what `kubectl apply -k` applies, no cluster needed) with the
    operator's files: the Secrets are made, every reference to them follows their hashed
    names, each service's key holds its own role's credential, each generated value is the
    file's."""
    result = kustomize(deployable)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    made = {d["spec"]["secretName"] for d in docs if d["kind"] == "Certificate"}
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] not in ("Deployment", "StatefulSet", "CronJob"):
            continue
        assert all(c["image"].startswith(("registry.example.com/crosslogic:", "nats",
                                          "postgres", "redis", "busybox"))
                   for c in containers(doc))
        refs = [i["valueFrom"]["secretKeyRef"] for c in containers(doc)
                for i in c.get("env", []) if "secretKeyRef" in i.get("valueFrom", {})]
        refs += [s["secretRef"] for c in containers(doc) for s in c.get("envFrom", [])
                 if "secretRef" in s]
        for ref in refs:
            secret = secrets[ref["name"]]
            keys = {*secret.get("data", {}), *secret.get("stringData", {})}
            assert "key" not in ref or ref["key"] in keys, f"{doc['metadata']['name']}: {ref}"
        for volume in pod_spec(doc).get("volumes", []):
            if "secret" in volume and not volume["secret"].get("optional"):
                assert volume["secret"]["secretName"] in {*secrets, *made}
    (credentials,) = [s for n, s in secrets.items() if n.startswith("nats-credentials-")]
    for key, value in credentials["data"].items():
        creds = Credentials.parse(base64.b64decode(value).decode())
        assert f"{creds.role}.creds" == key
    generators = {g["name"]: g for g in kustomization()["secretGenerator"]}
    for name in OPERATOR_SECRETS:
        (secret,) = [s for n, s in secrets.items() if n.rsplit("-", 1)[0] == name]
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        want = {k: v for k, _, v in (str(i).partition("=")
                                     for i in generators[name].get("literals", []))}
        for path in generators[name].get("envs", []):
            want.update(env_file((deployable / path).read_text()))
        assert data == want, name


@needs_kubectl
def test_kustomize_stops_without_each_of_the_operators_files(deployable: Path,
                                                              tmp_path: Path) -> None:
    """Without any one of the files (a password the operator has not made, a credential not
    copied) the build fails and names it: nothing is applied with a gap or a placeholder."""
    bare = tmp_path / "bare"
    shutil.copytree(deployable, bare, ignore=shutil.ignore_patterns("nats-auth", "secrets"))
    missing = kustomize(bare)
    assert missing.returncode != 0 and "nats-auth" in missing.stderr
    sources = [s for g in kustomization()["secretGenerator"] for s in generator_sources(g)]
    assert any(s.startswith("secrets/") for s in sources)
    for source in sources:
        folder = tmp_path / source.replace("/", "_")
        shutil.copytree(deployable, folder)
        (folder / source).unlink()
        result = kustomize(folder)
        assert result.returncode != 0, f"built without {source}"
        assert source in result.stderr, result.stderr


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
    # Migrations before the service starts (and the relay makes the JetStream streams).
    inits = [c["command"] for c in spec["initContainers"]]
    assert inits[0] == ["crosslogic", "migrate"]
    assert inits[1:] == ([["crosslogic", "nats", "setup"]] if name == "relay" else [])


def nats_identities(docs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """{(workload, container): the nats-credentials key its NATS_CREDS comes from}."""
    found = {}
    for doc in docs:
        for container in containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == "nats-credentials":
                    assert item["name"] == "NATS_CREDS", item
                    found[(doc["metadata"]["name"], container["name"])] = ref["key"]
    return found


def test_every_service_connects_to_nats_as_its_own_identity() -> None:
    want = {(name, name): f"{role}.creds" for name, role in NATS_ROLES.items()}
    want[("relay", "nats-setup")] = "provisioner.creds"
    assert nats_identities(workloads()) == want
    for name in CONTROL_PLANE:
        (container,) = pod_spec(objects("Deployment")[name])["containers"]
        assert "NATS_CREDS" in resolved_env(container)


def test_the_identity_check_catches_a_borrowed_credential() -> None:
    billing = copy.deepcopy(objects("Deployment")["billing"])
    (container,) = pod_spec(billing)["containers"]
    creds = next(i for i in container["env"] if i["name"] == "NATS_CREDS")
    creds["valueFrom"]["secretKeyRef"]["key"] = "gateway.creds"  # billing as the gateway
    docs = [billing if d is objects("Deployment")["billing"] else d for d in workloads()]
    assert nats_identities(docs)[("billing", "billing")] == "gateway.creds"
    assert nats_identities(docs) != nats_identities(workloads())


def secret_users() -> dict[str, set[str]]:
    """{Secret: the workloads that read it, by env or volume}."""
    users: dict[str, set[str]] = {}
    for doc in workloads():
        name = doc["metadata"]["name"]
        for volume in pod_spec(doc).get("volumes", []):
            if "secret" in volume:
                users.setdefault(volume["secret"]["secretName"], set()).add(name)
        for container in containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    users.setdefault(ref["name"], set()).add(name)
    return users


def test_the_nats_keys_reach_only_who_needs_them() -> None:
    users = secret_users()
    # The issuer mints any node's credential and pushes revocations as the system account.
    assert users["nats-node-issuer"] == {"orchestrator"}
    assert users["nats-server-auth"] == {"nats", "nats-edge"}
    assert users["nats-nodes-tls"] == {"nats-edge"}
    # What opens a route: the NATS servers' only.
    assert users["nats-routes-auth"] == {"nats", "nats-edge"}
    assert users["nats-routes-tls"] == {"nats", "nats-edge"}
    (orchestrator,) = pod_spec(objects("Deployment")["orchestrator"])["containers"]
    issuer = next(i for i in orchestrator["env"] if i["name"] == "NATS_NODE_ISSUER")
    assert issuer["valueFrom"]["secretKeyRef"] == {"name": "nats-node-issuer",
                                                    "key": "issuer.json"}


def test_every_platform_container_runs_a_real_program_with_real_settings() -> None:
    checked = 0
    for doc in workloads():
        for container in containers(doc):
            if is_platform(container):
                # A variable the command line names, $(NAME), is read by Kubernetes itself.
                named = set(re.findall(r"\$\((\w+)\)", " ".join(container["command"])))
                env = {k: v for k, v in resolved_env(container).items() if k not in named}
                program_of(container["command"]).check(env)
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
    # The password PostgreSQL is started with (the operator's secrets/, as the recipe makes).
    assert urllib.parse.urlsplit(url).password == credentials["POSTGRES_PASSWORD"]
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
    # The services' REDIS_URL carries the password Redis requires.
    password = resolved_env(container)["REDIS_PASSWORD"]
    url = urllib.parse.urlsplit(data_of("Secret", "crosslogic-secrets")["REDIS_URL"])
    assert (url.hostname, url.password) == ("redis", password)
    assert '--requirepass "$REDIS_PASSWORD"' in container["command"][-1]


def test_redis_refuses_an_empty_password(tmp_path: Path) -> None:
    """`--requirepass ""` would leave Redis open: the container's command stops first."""
    (container,) = pod_spec(objects("Deployment")["redis"])["containers"]
    argv = container["command"]
    assert argv[:2] == ["sh", "-c"]
    fake = tmp_path / "redis-server"
    fake.write_text('#!/bin/sh\necho "started with $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    empty = subprocess.run(argv, env={**env, "REDIS_PASSWORD": ""}, capture_output=True,
                           text=True, timeout=10, check=False)
    assert empty.returncode != 0 and "started" not in empty.stdout
    assert "REDIS_PASSWORD" in empty.stderr
    good = subprocess.run(argv, env={**env, "REDIS_PASSWORD": "s3cret"}, capture_output=True,
                          text=True, timeout=10, check=False)
    assert good.returncode == 0 and "--requirepass s3cret" in good.stdout


def mount_of(container: dict[str, Any], volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def volume_source(doc: dict[str, Any], volume: str) -> dict[str, Any]:
    (found,) = [v for v in pod_spec(doc)["volumes"] if v["name"] == volume]
    return found


def included(config: str, config_dir: str) -> list[str]:
    """The files a nats-server configuration includes (relative to its own folder)."""
    return [posixpath.normpath(posixpath.join(config_dir, f))
            for f in re.findall(r"^\s*include\s+(\S+)", config, flags=re.MULTILINE)]


def conf_block(config: str, name: str, *, nested: bool = False) -> str:
    """The body of the block `name { … }` of a nats-server configuration: a top-level one
    (unindented), or with `nested` the first at any depth of `config` (a block's body)."""
    indent = r"[ \t]*" if nested else ""
    match = re.search(rf"^{indent}{name}\s*\{{", config, flags=re.MULTILINE)
    assert match is not None, f"no {name} block"
    depth, end = 1, match.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(config[end], 0)
        end += 1
    return config[match.end():end - 1]


def conf_value(block: str, key: str) -> str:
    match = re.search(rf"^\s*{key}\s*[:=]\s*(\S+)", block, flags=re.MULTILINE)
    assert match is not None, f"no {key}"
    return match.group(1)


def conf_routes(cluster: str) -> list[str]:
    match = re.search(r"^\s*routes\s*[:=]\s*\[(.*?)\]", cluster, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "no routes"
    return re.split(r"[\s,]+", match.group(1).strip())


# The NATS servers: {StatefulSet: its ConfigMap}.
NATS_SERVERS = {"nats": "nats-config", "nats-edge": "nats-edge-config"}


def nats_server(name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(its StatefulSet, its nats-server container, its nats.conf)."""
    doc = objects("StatefulSet")[name]
    container = next(c for c in pod_spec(doc)["containers"] if c["name"] == "nats")
    return doc, container, data_of("ConfigMap", NATS_SERVERS[name])["nats.conf"]


def persistent(doc: dict[str, Any], volume: str) -> bool:
    """Whether a pod's `volume` outlives the pod (a StatefulSet's claim template or a
    PersistentVolumeClaim), rather than starting empty with each pod (emptyDir)."""
    sources = [v for v in pod_spec(doc).get("volumes", []) if v["name"] == volume]
    if sources:
        return "persistentVolumeClaim" in sources[0]
    return volume in {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}


def dns_name_matches(pattern: str, host: str) -> bool:
    """A certificate's DNS name (a wildcard covers one label) against a host name."""
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern


@pytest.mark.parametrize("name", sorted(NATS_SERVERS))
def test_nats_servers_authenticate_with_the_generated_configuration(name: str) -> None:
    """Every NATS server includes the authority's server.conf from the Secret, and keeps the
    account JWTs (revocations) where `crosslogic nats init` told the resolver to: on /data, a
    volume of its own that outlives the pod (a restarted server starting from the preloaded
    account JWT would take revoked node credentials until it synced)."""
    doc, container, config = nats_server(name)
    config_file = container["args"][container["args"].index("-c") + 1]
    config_dir = posixpath.dirname(config_file)
    assert mount_of(container, "config") == config_dir
    assert volume_source(doc, "config")["configMap"]["name"] == NATS_SERVERS[name]
    assert posixpath.basename(config_file) == "nats.conf"
    auth_dir = mount_of(container, "auth")
    assert included(config, config_dir) == [f"{auth_dir}/server.conf"]
    assert volume_source(doc, "auth")["secret"]["secretName"] == "nats-server-auth"
    assert "server.conf" in data_of("Secret", "nats-server-auth")
    resolver_dir = build_parser().parse_args(["nats", "init", "x"]).resolver_dir
    assert resolver_dir.startswith(mount_of(container, "data") + "/")
    assert persistent(doc, "data"), f"{name}: the account JWTs are lost with the pod"
    assert "no_advertise: true" in conf_block(config, "cluster"), \
        "clients are not sent unreachable pod addresses"


def test_the_persistence_check_catches_an_empty_dir() -> None:
    edge = copy.deepcopy(objects("StatefulSet")["nats-edge"])
    assert persistent(edge, "data")
    edge["spec"]["template"]["spec"]["volumes"].append({"name": "data", "emptyDir": {}})
    assert not persistent(edge, "data")


@pytest.mark.parametrize("name", sorted(NATS_SERVERS))
def test_routes_take_only_a_peer_with_the_password_and_the_routes_certificate(
        name: str) -> None:
    """Routes carry every account's messages: each server asks a route for the routes'
    password (generated from the operator's file) and, over TLS both ways, for a certificate
    of the routes' CA; it dials its peers by the names that certificate holds, with the
    password in the URL, and tells them its own such name. (Run: tests/unit/
    test_infra_nats.py.)"""
    doc, container, config = nats_server(name)
    cluster = conf_block(config, "cluster")
    authorization = conf_block(cluster, "authorization", nested=True)
    assert conf_value(authorization, "user") == "route"
    assert conf_value(authorization, "password") == "$NATS_ROUTE_PASSWORD"
    (password,) = [i for i in container["env"] if i["name"] == "NATS_ROUTE_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "nats-routes-auth",
                                                      "key": "NATS_ROUTE_PASSWORD"}
    (generator,) = [g for g in kustomization()["secretGenerator"]
                    if g["name"] == "nats-routes-auth"]
    assert generator_sources(generator) == ["secrets/nats-routes.env"]

    tls = conf_block(cluster, "tls", nested=True)
    tls_dir = mount_of(container, "routes-tls")
    assert {k: conf_value(tls, k) for k in ("cert_file", "key_file", "ca_file")} == {
        "cert_file": f"{tls_dir}/tls.crt", "key_file": f"{tls_dir}/tls.key",
        "ca_file": f"{tls_dir}/ca.crt"}
    certificate = objects("Certificate")["nats-routes"]
    assert volume_source(doc, "routes-tls")["secret"]["secretName"] == \
        certificate["spec"]["secretName"]
    assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
    names = certificate["spec"]["dnsNames"]

    pod = f"{name}-0"
    env = resolved_env(container, {"metadata.name": pod})
    jetstream = objects("StatefulSet")["nats"]
    peers = [f"nats-{i}.{jetstream['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
             for i in range(jetstream["spec"]["replicas"])]
    routes = conf_routes(cluster)
    assert all(r.startswith("$") for r in routes), "routes come from the environment"
    urls = [urllib.parse.urlsplit(env[r[1:]]) for r in routes]
    assert [u.hostname for u in urls] == peers
    for url in urls:
        assert (url.scheme, url.username, url.port) == ("nats", "route", 6222)
        assert url.password == env["NATS_ROUTE_PASSWORD"]
        assert any(dns_name_matches(n, str(url.hostname)) for n in names), url.hostname

    assert conf_value(cluster, "advertise") == "$NATS_CLUSTER_ADVERTISE"
    host, _, port = env["NATS_CLUSTER_ADVERTISE"].rpartition(":")
    headless = objects("Service")[doc["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # peers dial before it is ready
    assert headless["spec"]["selector"].items() <= \
        doc["spec"]["template"]["metadata"]["labels"].items()
    assert (host, port) == (f"{pod}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local",
                            "6222")
    assert any(dns_name_matches(n, host) for n in names)

    # A renewed certificate is taken: the reloader watches it and signals nats-server.
    reloader = next(c for c in pod_spec(doc)["containers"] if c["name"] == "reloader")
    args = reloader["args"]
    watched = {args[i + 1] for i, a in enumerate(args) if a == "-config"}
    assert mount_of(reloader, "routes-tls") == tls_dir
    assert {f"{tls_dir}/{key}" for key in CERTIFICATE_KEYS} <= watched
    assert pod_spec(doc)["shareProcessNamespace"] is True
    pid_file = conf_value(config, "pid_file")
    assert args[args.index("-pid") + 1] == pid_file


def test_the_route_check_catches_an_open_route() -> None:
    open_cluster = re.sub(r"authorization \{.*?\}", "", data_of(
        "ConfigMap", "nats-config")["nats.conf"], flags=re.DOTALL)
    with pytest.raises(AssertionError, match="no authorization"):
        conf_block(conf_block(open_cluster, "cluster"), "authorization", nested=True)


def test_the_routes_ca_is_private_and_its_key_reaches_nobody() -> None:
    """The routes' certificate comes from a CA of the namespace's own, self-signed by
    cert-manager: a certificate from any other issuer (a public one included) opens no route.
    The CA's key (its Secret) is mounted by no pod."""
    issuers = objects("Issuer")
    leaf = objects("Certificate")["nats-routes"]
    ref = leaf["spec"]["issuerRef"]
    assert (ref["group"], ref["kind"]) == ("cert-manager.io", "Issuer")
    ca_secret = issuers[ref["name"]]["spec"]["ca"]["secretName"]
    (ca,) = [c for c in objects("Certificate").values() if c["spec"]["secretName"] == ca_secret]
    assert ca["spec"]["isCA"] is True
    assert ca["spec"]["privateKey"]["rotationPolicy"] == "Never"  # leaves valid on renewal
    root = ca["spec"]["issuerRef"]
    assert root["kind"] == "Issuer" and issuers[root["name"]]["spec"] == {"selfSigned": {}}
    assert ca_secret not in secret_users()


def test_nats_is_a_three_node_jetstream_cluster() -> None:
    nats, container, config = nats_server("nats")
    assert nats["spec"]["replicas"] == 3
    headless = objects("Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert "jetstream {" in config
    env = resolved_env(container)
    routes = [urllib.parse.urlsplit(env[r[1:]]).hostname for r in conf_routes(
        conf_block(config, "cluster"))]
    assert routes == [f"nats-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
                      for i in range(3)]
    assert "server_name: $SERVER_NAME" in config  # unique per pod, as JetStream clustering needs
    assert env["SERVER_NAME"]
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert objects("PodDisruptionBudget")["nats"]["spec"]["maxUnavailable"] == 1
    assert data_of("ConfigMap", "crosslogic-config")["NATS_URL"] == "nats://nats:4222"
    assert "nats" in objects("Service")
    # Each stream the services create is kept on every server, so it outlives one.
    for name in CONTROL_PLANE:
        (service,) = pod_spec(objects("Deployment")[name])["containers"]
        assert resolved_env(service)["NATS_STREAM_REPLICAS"] == str(nats["spec"]["replicas"])


# --------------------------------------------------------------------------- edges


def test_gpu_nodes_reach_nats_over_tls_with_a_certificate_for_their_url() -> None:
    """NODE_NATS_URL names the certificate's host and the load balancer's port, with TLS and
    no password (each node brings its own credential); the servers behind it require TLS
    with that certificate and join the JetStream cluster."""
    (orchestrator,) = pod_spec(objects("Deployment")["orchestrator"])["containers"]
    url = urllib.parse.urlsplit(resolved_env(orchestrator)["NODE_NATS_URL"])
    assert url.scheme == "tls"
    assert url.username is None and url.password is None
    certificate = objects("Certificate")["nats-nodes"]
    assert url.hostname in certificate["spec"]["dnsNames"]
    issuer = certificate["spec"]["issuerRef"]
    assert (issuer["group"], issuer["kind"]) == ("cert-manager.io", "ClusterIssuer")
    service = objects("Service")["nats-nodes"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # NetworkPolicy sees the node
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    edge, nats, config = nats_server("nats-edge")
    assert service["spec"]["selector"].items() <= \
        edge["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["containerPort"] for p in nats["ports"]}[port["targetPort"]] == 4222
    tls = conf_block(config, "tls")  # the client port's (top level)
    files = {k: conf_value(tls, k) for k in ("cert_file", "key_file")}
    tls_dir = mount_of(nats, "tls")
    assert files == {"cert_file": f"{tls_dir}/tls.crt", "key_file": f"{tls_dir}/tls.key"}
    assert volume_source(edge, "tls")["secret"]["secretName"] == \
        certificate["spec"]["secretName"]
    assert "jetstream" not in config
    # In the JetStream servers' cluster: same name, same routes (to their pods).
    _, jetstream, cluster_config = nats_server("nats")
    edge_cluster = conf_block(config, "cluster")
    cluster = conf_block(cluster_config, "cluster")
    assert conf_value(edge_cluster, "name") == conf_value(cluster, "name")
    assert conf_routes(edge_cluster) == conf_routes(cluster)
    for route in conf_routes(cluster):
        assert resolved_env(nats)[route[1:]] == resolved_env(jetstream)[route[1:]]
    # The JetStream servers' client port takes no TLS: only the platform's pods reach it.
    assert not re.search(r"^tls\s*\{", cluster_config, flags=re.MULTILINE)


def test_the_nodes_cidr_is_the_same_at_the_load_balancer_and_in_the_policy() -> None:
    ranges = objects("Service")["nats-nodes"]["spec"]["loadBalancerSourceRanges"]
    policy = objects("NetworkPolicy")["nats-edge-from-nodes"]
    cidrs = [peer["ipBlock"]["cidr"] for rule in policy["spec"]["ingress"]
             for peer in rule["from"]]
    assert ranges == cidrs


def test_the_certificates_are_cert_manager_certificates() -> None:
    """cert-manager's CRDs have no schema here: their fields, by hand; every issuer a
    certificate names is in the manifests, or the ClusterIssuer the operator provides."""
    issuers = objects("Issuer")
    for issuer in issuers.values():
        assert issuer["apiVersion"] == "cert-manager.io/v1"
        (kind,) = issuer["spec"]
        assert kind in ("selfSigned", "ca")
        if kind == "ca":
            assert set(issuer["spec"]["ca"]) == {"secretName"}
    for certificate in objects("Certificate").values():
        assert certificate["apiVersion"] == "cert-manager.io/v1"
        spec = certificate["spec"]
        assert set(spec) <= {"secretName", "dnsNames", "issuerRef", "privateKey", "duration",
                             "renewBefore", "usages", "commonName", "isCA"}
        assert set(spec["issuerRef"]) == {"group", "kind", "name"}
        ref = spec["issuerRef"]
        assert ref["name"] in (issuers if ref["kind"] == "Issuer" else EXTERNAL_ISSUERS)
        if not spec.get("isCA"):
            assert spec["privateKey"]["rotationPolicy"] == "Always"
            assert spec["dnsNames"]
        assert all(re.fullmatch(r"(\*\.)?[a-z0-9.-]+", n) for n in spec.get("dnsNames", []))


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


def test_hourly_backup_off_the_cluster() -> None:
    (cron,) = objects("CronJob").values()
    assert cron["spec"]["schedule"] == "0 * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (backup,) = pod_spec(cron)["containers"]
    assert backup["command"][:4] == ["crosslogic", "backup", "--to", "$(BACKUP_S3_URL)"]
    # Where, and the storage's credentials, from a Secret the kustomization generates.
    (source,) = backup["envFrom"]
    generated = {g["name"] for g in kustomization()["secretGenerator"]}
    assert source["secretRef"]["name"] in generated
    # No volume holds them in the cluster: only room for the dump on its way up.
    assert not objects("PersistentVolumeClaim").keys() & {"postgres-backups"}
    assert all("persistentVolumeClaim" not in v for v in pod_spec(cron)["volumes"])


def test_files_are_named_after_what_they_hold() -> None:
    for name in CONTROL_PLANE:
        kinds = {doc["kind"] for f, doc in manifests() if f == f"{name}.yaml"}
        assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}, name
    assert all(Path(K8S / f).exists() for f, _ in manifests())
