"""The launcher for real clouds, through SkyPilot's Python SDK.

`sky.launch`, `sky.down` and `sky.status` return request ids that `sky.get` waits on; all of
it blocks, so it runs in the launcher's own thread pool (launches take minutes: they must not
starve the event loop's default executor). `sky` is imported there too: it is slow to import
and only this launcher needs it.

`sky.status` is asked for every user's clusters (`all_users=True`): SkyPilot keeps clusters
per user, and orchestrator replicas on different pods may well be different SkyPilot users —
a standby that took over would otherwise see none of its predecessor's clusters and take the
whole fleet for lost. What the platform owns is what carries its cluster prefix.

What SkyPilot answers is turned into the launcher's terms by two pure functions,
`cluster_states` and `launch_error`, tested offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from services.orchestrator.launcher import ClusterState, LaunchError, LaunchSpec, owns_cluster
from services.orchestrator.skypilot_task import TaskOptions, UnservableWeights, task_config

log = structlog.get_logger("skypilot")

_STATES = {"UP": ClusterState.UP, "INIT": ClusterState.STARTING,
           "PENDING": ClusterState.STARTING, "STOPPED": ClusterState.STOPPED,
           "AUTOSTOPPING": ClusterState.STOPPED}


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def cluster_states(records: Iterable[Any], prefix: str) -> dict[str, ClusterState]:
    """`sky.status` records (StatusResponse models; plain dicts from older SDKs) → the state of
    every cluster this platform owns (CLUSTER_PREFIX `prefix`, see launcher.owns_cluster). A
    status we do not know is "starting": not up, not gone either."""
    out: dict[str, ClusterState] = {}
    for r in records:
        name = str(_field(r, "name") or "")
        if not owns_cluster(prefix, name):
            continue
        status = _field(r, "status")
        out[name] = _STATES.get(str(getattr(status, "value", status)), ClusterState.STARTING)
    return out


def launch_error(exc: BaseException) -> LaunchError:
    """What a failed `sky.launch` means for the orchestrator. No resources anywhere SkyPilot
    looked (ResourcesUnavailableError) is a capacity error: try another region, or on-demand.
    Unless SkyPilot says failing over would not help (`no_failover`: the request itself cannot
    be met), and everything else (credentials, quota, the API server, a setup that failed)
    is an error."""
    import sky.exceptions

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, sky.exceptions.ResourcesUnavailableError) and not exc.no_failover:
        return LaunchError(text, capacity=True)
    return LaunchError(text)


def _launch(config: dict[str, Any], cluster: str) -> None:
    import sky

    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # it consumes the dict
    try:
        sky.get(sky.launch(task, cluster_name=cluster, retry_until_up=False))
    except Exception as exc:
        raise launch_error(exc) from exc


def _down(cluster: str) -> None:
    import sky

    with contextlib.suppress(sky.exceptions.ClusterDoesNotExist):  # already gone: done
        sky.get(sky.down(cluster))


def _status(prefix: str) -> dict[str, ClusterState]:
    import sky

    records = sky.get(sky.status(refresh=sky.StatusRefreshMode.AUTO, all_users=True))
    return cluster_states(records, prefix)


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
            config = task_config(spec, self.options)
        except UnservableWeights as exc:
            raise LaunchError(str(exc)) from exc
        try:
            await self._run(_launch, config, spec.cluster_name)
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
