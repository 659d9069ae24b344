"""The launcher for the local cloud (`python -m agent.local_cloud`): same interface and same
node environment as SkyPilot, machines are processes on this host."""

from __future__ import annotations

import aiohttp

from services.orchestrator.launcher import ClusterState, LaunchError, LaunchSpec, owns_cluster


class LocalLauncher:
    name = "local"

    def __init__(self, cloud_url: str, *, prefix: str, timeout: float = 30.0) -> None:
        self.cloud_url = cloud_url.rstrip("/")
        self.prefix = prefix
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def launch(self, spec: LaunchSpec) -> None:
        body = {"name": spec.cluster_name, "provider": spec.provider, "region": spec.region,
                "spot": spec.spot, "model_name": spec.model_name,
                "env": {**spec.env, **spec.secrets}}
        if spec.weights is not None:
            body["weights_source"] = str(spec.weights)
        try:
            async with self._session.post(f"{self.cloud_url}/clusters", json=body) as resp:
                if resp.status < 300:
                    return
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LaunchError(f"local cloud unreachable: {exc}") from exc
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        raise LaunchError(str(error.get("message", f"HTTP {resp.status}")),
                          capacity=error.get("type") == "capacity")

    async def down(self, cluster_name: str) -> None:
        try:
            async with self._session.delete(f"{self.cloud_url}/clusters/{cluster_name}") as resp:
                if resp.status >= 300 and resp.status != 404:
                    raise LaunchError(f"down {cluster_name}: HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LaunchError(f"local cloud unreachable: {exc}") from exc

    async def clusters(self) -> dict[str, ClusterState]:
        try:
            async with self._session.get(f"{self.cloud_url}/clusters") as resp:
                resp.raise_for_status()
                payload = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LaunchError(f"local cloud unreachable: {exc}") from exc
        return {c["name"]: ClusterState.UP for c in payload["clusters"]
                if owns_cluster(self.prefix, c["name"])}

    async def close(self) -> None:
        await self._session.close()
