"""The launcher for real clouds, through SkyPilot's Python SDK.

`sky.launch`, `sky.down` and `sky.status` return request ids that `sky.get` waits on; all of
it blocks, so it runs in the launcher's own thread pool (launches take minutes: they must not
starve the event loop's default executor). `sky` is imported there too: it is slow to import
and only this launcher needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from services.orchestrator.launcher import ClusterState, LaunchError, LaunchSpec
from services.orchestrator.skypilot_task import TaskOptions, task_config

log = structlog.get_logger("skypilot")

_STATES = {"UP": ClusterState.UP, "INIT": ClusterState.STARTING,
           "PENDING": ClusterState.STARTING, "STOPPED": ClusterState.STOPPED,
           "AUTOSTOPPING": ClusterState.STOPPED}


def _launch(config: dict[str, Any], cluster: str) -> None:
    import sky

    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # it consumes the dict
    try:
        sky.get(sky.launch(task, cluster_name=cluster, retry_until_up=False))
    except sky.exceptions.ResourcesUnavailableError as exc:
        raise LaunchError(str(exc), capacity=True) from exc


def _down(cluster: str) -> None:
    import sky

    with contextlib.suppress(sky.exceptions.ClusterDoesNotExist):  # already gone: done
        sky.get(sky.down(cluster))


def _status(prefix: str) -> dict[str, ClusterState]:
    import sky

    records = sky.get(sky.status(refresh=sky.StatusRefreshMode.AUTO))
    out: dict[str, ClusterState] = {}
    for r in records:
        name = str(r.name)
        if name.startswith(prefix):
            status = getattr(r.status, "value", str(r.status))
            out[name] = _STATES.get(str(status), ClusterState.STARTING)
    return out


class SkyPilotLauncher:
    name = "skypilot"

    def __init__(self, *, prefix: str, options: TaskOptions, max_concurrent: int) -> None:
        self.prefix = prefix
        self.options = options
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent + 2,
                                        thread_name_prefix="skypilot")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def launch(self, spec: LaunchSpec) -> None:
        try:
            await self._run(_launch, task_config(spec, self.options), spec.cluster_name)
        except LaunchError:
            raise
        except Exception as exc:
            raise LaunchError(f"{type(exc).__name__}: {exc}") from exc

    async def down(self, cluster_name: str) -> None:
        try:
            await self._run(_down, cluster_name)
        except Exception as exc:
            raise LaunchError(f"down {cluster_name}: {type(exc).__name__}: {exc}") from exc

    async def clusters(self) -> dict[str, ClusterState]:
        try:
            result: dict[str, ClusterState] = await self._run(_status, self.prefix)
        except Exception as exc:
            raise LaunchError(f"status: {type(exc).__name__}: {exc}") from exc
        return result

    async def close(self) -> None:
        # A launch in flight cannot be cancelled from here; its thread finishes on its own.
        self._pool.shutdown(wait=False, cancel_futures=True)
