"""The local cloud's machines: each is a vLLM simulator and a node agent, two processes.

It behaves like a cloud where it matters to the control plane:
- a launch starts the machine and returns; the agent registers by itself, later;
- a region can run out of capacity (spot or on-demand), and launches there fail;
- a machine whose simulator dies has crashed: the cloud kills what is left and forgets it;
- a spot preemption posts the provider's notice on the machine's metadata service and takes
  the machine away at the deadline, whatever is running;
- `terminate` (sky down) stops both processes: draining is the caller's business;
- a launch names the model's weights source as the orchestrator has it: a `file://` directory
  must exist on this host (the machine "loads" it: a missing one fails the launch, as a
  SkyPilot machine whose copy failed never starts), `hf://` and `r2://` are recorded only
  (the simulator needs no weights); either way the simulator serves the catalog's name;
- the machine's vLLM takes the launch's VLLM_API_KEY, as `vllm serve` on a SkyPilot machine
  does (the environment, not the command line, so the process list does not show it); the
  agent, which reads only `/health` and `/metrics`, does not get it.

Every process dies with the cloud (PR_SET_PDEATHSIG), so nothing outlives a test or
`crosslogic dev`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import structlog

from agent.local_cloud.metadata import MetadataState
from services.domain.catalog.weights import FileWeights, InvalidWeightsSource, parse_weights_source
from services.infra.aio import within
from services.infra.processes import die_with_parent

log = structlog.get_logger("local_cloud")

LISTENING = "vllm simulator listening on "
API_KEY = "VLLM_API_KEY"


class CloudError(Exception):
    def __init__(self, message: str, *, kind: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class CloudConfig:
    simulator_args: tuple[str, ...] = ()
    """Extra `python -m agent.simulator` flags for every machine (latencies, faults)."""
    agent_env: tuple[tuple[str, str], ...] = ()
    """Environment every machine's agent gets (the machine image's defaults, such as
    SPOT_POLL_INTERVAL); the launch's own environment wins."""
    log_dir: Path | None = None
    """Each machine's processes log to `<name>.simulator.log` and `<name>.agent.log`."""
    stop_timeout: float = 5.0
    start_timeout: float = 20.0


@dataclass(frozen=True)
class MachineRequest:
    name: str
    provider: str
    region: str
    spot: bool
    model_name: str
    env: dict[str, str] = field(repr=False)
    weights_source: str | None = None


def weights_dir(source: str | None) -> Path | None:
    """The directory a `file://` source names (None for other sources). Raises CloudError for
    a source the catalog would not have taken."""
    if source is None:
        return None
    try:
        weights = parse_weights_source(source)
    except InvalidWeightsSource as exc:
        raise CloudError(f"weights_source {exc}") from None
    return Path(weights.path) if isinstance(weights, FileWeights) else None


@dataclass
class Machine:
    request: MachineRequest
    simulator: asyncio.subprocess.Process
    agent: asyncio.subprocess.Process
    endpoint: str
    metadata: MetadataState
    launched_at: datetime
    reclaim_at: datetime | None = None
    stopping: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        r = self.request
        return {"name": r.name, "status": "up", "provider": r.provider, "region": r.region,
                "spot": r.spot, "model_name": r.model_name,
                "weights_source": r.weights_source, "endpoint": self.endpoint,
                "agent_running": self.agent.returncode is None,
                "launched_at": self.launched_at.isoformat(),
                "reclaim_at": self.reclaim_at.isoformat() if self.reclaim_at else None}


async def _kill(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM, and SIGKILL after `timeout`; at once when `timeout` is 0 (a crash, a reclaim:
    nothing gets to say goodbye)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM if timeout > 0 else signal.SIGKILL)
    try:
        await within(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class LocalCloud:
    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self.machines: dict[str, Machine] = {}
        self.full: set[tuple[str, bool]] = set()
        """(region, spot) with no capacity left."""
        self._logs: list[IO[bytes]] = []

    def set_capacity(self, region: str, spot: bool, available: bool) -> None:
        (self.full.discard if available else self.full.add)((region, spot))

    def _log_file(self, name: str, what: str) -> IO[bytes] | int:
        if self.config.log_dir is None:
            return asyncio.subprocess.DEVNULL
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.config.log_dir / f"{name}.{what}.log", "ab")  # noqa: SIM115
        self._logs.append(f)
        return f

    async def launch(self, req: MachineRequest, metadata_url: str) -> Machine:
        if req.name in self.machines:
            return self.machines[req.name]  # like sky launch: an existing cluster is reused
        if (req.region, req.spot) in self.full:
            kind = "spot" if req.spot else "on-demand"
            raise CloudError(f"no {kind} capacity in {req.region}", kind="capacity",
                             status=503)
        weights = weights_dir(req.weights_source)
        if weights is not None and not weights.is_dir():
            raise CloudError(f"the machine cannot load its weights: {weights} is not a "
                             "directory on this host", kind="launch_failed", status=422)
        # Only the launch's key: one the cloud itself was started with is no machine's.
        simulator_env = {k: v for k, v in os.environ.items() if k != API_KEY}
        if req.env.get(API_KEY):
            simulator_env[API_KEY] = req.env[API_KEY]
        simulator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.simulator", "--port", "0", "--model", req.model_name,
            *self.config.simulator_args, env=simulator_env, stdout=asyncio.subprocess.PIPE,
            stderr=self._log_file(req.name, "simulator"), stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)
        try:
            assert simulator.stdout is not None
            line = (await within(simulator.stdout.readline(),
                                 self.config.start_timeout)).decode().strip()
            if not line.startswith(LISTENING):
                raise CloudError(f"the machine's vLLM did not start: {line!r}",
                                 kind="launch_failed", status=500)
        except BaseException:
            await _kill(simulator, self.config.stop_timeout)
            raise
        endpoint = line.removeprefix(LISTENING)
        env = {**os.environ, **dict(self.config.agent_env), **req.env, "VLLM_URL": endpoint,
               "ENDPOINT_URL": endpoint,
               "METADATA_URL": metadata_url}
        env.pop(API_KEY, None)
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file(req.name, "agent"), stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent)
        machine = Machine(req, simulator, agent, endpoint, MetadataState(), datetime.now(UTC))
        self.machines[req.name] = machine
        machine.tasks.append(asyncio.create_task(self._drain_stdout(simulator)))
        machine.tasks.append(asyncio.create_task(self._watch(machine)))
        log.info("machine launched", cluster=req.name, region=req.region, spot=req.spot,
                 endpoint=endpoint, weights_source=req.weights_source)
        return machine

    async def _drain_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.read(65536):
            pass

    async def _watch(self, machine: Machine) -> None:
        """A machine whose vLLM dies has crashed: the rest of it goes too."""
        await machine.simulator.wait()
        if not machine.stopping:
            log.warning("machine crashed", cluster=machine.request.name,
                        exit_code=machine.simulator.returncode)
            await self._remove(machine, kill=True)

    async def terminate(self, name: str, *, kill: bool = False) -> None:
        machine = self.machines.get(name)
        if machine is None:
            raise CloudError(f"no cluster named {name}", kind="not_found", status=404)
        await self._remove(machine, kill=kill)

    async def _remove(self, machine: Machine, *, kill: bool) -> None:
        machine.stopping = True
        self.machines.pop(machine.request.name, None)
        timeout = 0.0 if kill else self.config.stop_timeout
        await asyncio.gather(_kill(machine.agent, timeout), _kill(machine.simulator, timeout))
        current = asyncio.current_task()
        for task in machine.tasks:
            if task is not current:
                task.cancel()
        log.info("machine gone", cluster=machine.request.name, killed=kill)

    def preempt(self, name: str, notice: float) -> datetime:
        """The provider's spot notice now; the machine is taken at the deadline."""
        machine = self.machines.get(name)
        if machine is None:
            raise CloudError(f"no cluster named {name}", kind="not_found", status=404)
        if not machine.request.spot:
            raise CloudError(f"{name} is not a spot instance", kind="invalid_request")
        deadline = datetime.now(UTC) + timedelta(seconds=notice)
        machine.reclaim_at = deadline
        machine.metadata.preempt(machine.request.provider, deadline)
        machine.tasks.append(asyncio.create_task(self._reclaim(machine, notice)))
        log.info("spot preemption noticed", cluster=name, deadline=deadline.isoformat())
        return deadline

    async def _reclaim(self, machine: Machine, after: float) -> None:
        await asyncio.sleep(after)  # the cloud's own clock: the deadline is the deadline
        if self.machines.get(machine.request.name) is machine:
            log.info("spot instance reclaimed", cluster=machine.request.name)
            await self._remove(machine, kill=True)

    async def close(self) -> None:
        started = time.monotonic()
        await asyncio.gather(*(self._remove(m, kill=False) for m in list(self.machines.values())))
        for f in self._logs:
            f.close()
        log.info("local cloud closed", seconds=round(time.monotonic() - started, 2))
