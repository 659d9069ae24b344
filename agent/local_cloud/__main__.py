"""``python -m agent.local_cloud``: serve the local cloud until SIGTERM or SIGINT; machines
die with it. Prints one line: ``local cloud listening on http://127.0.0.1:PORT``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
from pathlib import Path

from aiohttp import web

from agent.local_cloud import CloudConfig, create_cloud_app
from services.infra.logging import configure_logging


async def serve(host: str, port: int, config: CloudConfig) -> None:
    runner = web.AppRunner(create_cloud_app(config), shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"local cloud listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m agent.local_cloud",
                                description="GPU nodes as local processes.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--simulator-args", default="",
                   help="extra simulator flags for every machine, e.g. '--ttft 0.05'")
    p.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every machine's agent (repeatable)")
    args = p.parse_args()
    agent_env = []
    for item in args.agent_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--agent-env wants KEY=VALUE, not {item!r}")
        agent_env.append((key, value))
    configure_logging("info", json=True, service="local-cloud")
    config = CloudConfig(simulator_args=tuple(shlex.split(args.simulator_args)),
                         agent_env=tuple(agent_env), log_dir=args.log_dir)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
