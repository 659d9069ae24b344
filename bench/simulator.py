"""vLLM simulator benchmark: requests/s and latency with no simulated latency, so the figures
are the simulator's own cost (what it adds in front of a gateway benchmark).

Starts ``python -m agent.simulator`` with zero TTFT/ITL in a subprocess (or uses --url), then
drives chat completions with an aiohttp client at concurrency 1 and 16, whole answers and
streams, for a few seconds each. Prints figures; it is not a test.
``python bench/simulator.py [--seconds 3] [--max-tokens 32] [--url http://host:port]``.
The client runs in this process: on a small machine it competes with the server for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.simulator", "--port", "0", "--ttft", "0", "--itl", "0",
        "--max-num-seqs", "256", cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        yield line.rsplit(" ", 1)[-1]
    finally:
        proc.terminate()
        await proc.wait()


async def run(session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int,
              seconds: float, stream: bool) -> tuple[int, list[float], list[float]]:
    latencies: list[float] = []
    first_bytes: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{r.status}: {await r.text()}")
                if stream:
                    first = await r.content.readany()
                    first_bytes.append(time.perf_counter() - started)
                    rest = first + await r.content.read()
                    if not rest.endswith(b"data: [DONE]\n\n"):
                        raise RuntimeError("stream did not end with [DONE]")
                else:
                    await r.read()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies, first_bytes if stream else []


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    cut = statistics.quantiles(values, n=100, method="inclusive")
    return f"{cut[int(q) - 1] * 1000:7.2f}"


async def bench(url: str | None, seconds: float, max_tokens: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        base = url or await stack.enter_async_context(simulator())
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64)))
        endpoint = f"{base}/v1/chat/completions"
        print(f"simulator at {base}; chat completions, max_tokens={max_tokens}, "
              f"{seconds:g}s per row")
        print(f"{'mode':<8} {'conc':>4} {'req/s':>9} {'tok/s':>10} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'p50 first byte':>15}")
        for stream in (False, True):
            body = msgspec.json.encode({
                "model": MODEL, "max_tokens": max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": "Write a short story about a GPU."}]})
            for concurrency in (1, 16):
                await run(session, endpoint, body, concurrency, 0.3, stream)  # warm up
                t0 = time.perf_counter()
                count, lat, first = await run(session, endpoint, body, concurrency, seconds,
                                              stream)
                elapsed = time.perf_counter() - t0
                print(f"{'stream' if stream else 'whole':<8} {concurrency:>4} "
                      f"{count / elapsed:>9,.0f} {count * max_tokens / elapsed:>10,.0f} "
                      f"{ms(lat, 50):>8} {ms(lat, 99):>8} {ms(first, 50):>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="an already running simulator (or vLLM)")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(bench(args.url, args.seconds, args.max_tokens))


if __name__ == "__main__":
    main()
