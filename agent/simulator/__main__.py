"""``python -m agent.simulator``: serve the simulator until SIGTERM or SIGINT.

Every flag defaults to a ``SIM_*`` environment variable (``--max-model-len`` ←
``SIM_MAX_MODEL_LEN``), then to SimulatorConfig's default. ``--port 0`` picks a free port;
the one line printed to stdout says which:
``vllm simulator listening on http://127.0.0.1:8000``.

``--api-key KEY [KEY ...]``, else the ``VLLM_API_KEY`` environment variable, as ``vllm serve``
reads them: requests to ``/v1`` then need ``Authorization: Bearer <one of them>``. The
environment keeps the key out of the process list.

``--kv-events-config JSON`` (``SIM_KV_EVENTS_CONFIG``), as vLLM's: publish KV cache events on
ZeroMQ (agent/simulator/kv_publisher.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from agent.simulator.app import create_app
from agent.simulator.config import (
    ConfigError,
    Faults,
    SimulatorConfig,
    kv_events_settings,
    validated,
)

SHUTDOWN_TIMEOUT = 2.0

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    d = SimulatorConfig()
    f = Faults()

    def default(name: str, fallback: Any) -> Any:
        return env.get(name, fallback)

    p = argparse.ArgumentParser(prog="python -m agent.simulator",
                                description="A vLLM-compatible OpenAI server simulator.")
    p.add_argument("--host", default=default("SIM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=default("SIM_PORT", 8000))
    p.add_argument("--model", default=default("SIM_MODEL", d.model))
    p.add_argument("--max-model-len", type=int,
                   default=default("SIM_MAX_MODEL_LEN", d.max_model_len))
    p.add_argument("--ttft", type=float, default=default("SIM_TTFT", d.time_to_first_token),
                   help="time to first token, seconds")
    p.add_argument("--itl", type=float, default=default("SIM_ITL", d.inter_token_latency),
                   help="inter-token latency, seconds")
    p.add_argument("--prefill-tokens-per-second", type=float,
                   default=default("SIM_PREFILL_TOKENS_PER_SECOND",
                                   d.prefill_tokens_per_second),
                   help="prompt tokens not in the prefix cache prefilled a second (0: free)")
    p.add_argument("--decode-seconds-per-seq", type=float,
                   default=default("SIM_DECODE_SECONDS_PER_SEQ", d.decode_seconds_per_seq),
                   help="what each other running sequence adds to a decode step, seconds")
    p.add_argument("--max-num-seqs", type=int,
                   default=default("SIM_MAX_NUM_SEQS", d.max_num_seqs))
    p.add_argument("--kv-cache-tokens", type=int,
                   default=default("SIM_KV_CACHE_TOKENS", d.kv_cache_tokens))
    p.add_argument("--block-size", type=int, default=default("SIM_BLOCK_SIZE", d.block_size))
    p.add_argument("--embedding-dimensions", type=int,
                   default=default("SIM_EMBEDDING_DIMENSIONS", d.embedding_dimensions))
    p.add_argument("--seed", type=int, default=default("SIM_SEED", d.seed))
    p.add_argument("--error-rate", type=float, default=default("SIM_ERROR_RATE", f.error_rate))
    p.add_argument("--slow-seconds", type=float,
                   default=default("SIM_SLOW_SECONDS", f.slow_seconds))
    p.add_argument("--hang-after-tokens", type=int,
                   default=default("SIM_HANG_AFTER_TOKENS", f.hang_after_tokens))
    p.add_argument("--drop-after-tokens", type=int,
                   default=default("SIM_DROP_AFTER_TOKENS", f.drop_after_tokens))
    p.add_argument("--health-503", action="store_true",
                   default=_env_flag(env, "SIM_HEALTH_503"))
    p.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="require one of these keys on /v1 (default: $VLLM_API_KEY)")
    p.add_argument("--kv-events-config", default=default("SIM_KV_EVENTS_CONFIG", None),
                   metavar="JSON",
                   help='publish KV cache events as vLLM does, e.g. {"enable_kv_cache_events":'
                        ' true, "publisher": "zmq", "endpoint": "tcp://*:5557", '
                        '"topic": "kv-events"}')
    return p


def config_from(argv: Sequence[str], env: Mapping[str, str]
                ) -> tuple[str, int, SimulatorConfig, list[str]]:
    """(host, port, config, API keys) from the flags, then the environment."""
    args = parser(env).parse_args(argv)
    # vLLM's rule: the flag wins over VLLM_API_KEY; empty keys are no keys.
    api_keys = [k for k in (args.api_key or [env.get("VLLM_API_KEY", "")]) if k]
    faults = Faults(error_rate=args.error_rate, slow_seconds=args.slow_seconds,
                    hang_after_tokens=args.hang_after_tokens,
                    drop_after_tokens=args.drop_after_tokens, health_503=args.health_503)
    endpoint, topic = (kv_events_settings(args.kv_events_config) if args.kv_events_config
                       else (None, ""))
    config = SimulatorConfig(
        model=args.model, max_model_len=args.max_model_len, time_to_first_token=args.ttft,
        inter_token_latency=args.itl, max_num_seqs=args.max_num_seqs,
        prefill_tokens_per_second=args.prefill_tokens_per_second,
        decode_seconds_per_seq=args.decode_seconds_per_seq,
        kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
        embedding_dimensions=args.embedding_dimensions, seed=args.seed, faults=faults,
        kv_events_endpoint=endpoint, kv_events_topic=topic)
    return args.host, args.port, config, api_keys


async def serve(host: str, port: int, config: SimulatorConfig,
                api_keys: Sequence[str] = ()) -> None:
    app = create_app(config, api_keys=api_keys)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"vllm simulator listening on http://{host}:{bound}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        host, port, config, api_keys = config_from(sys.argv[1:] if argv is None else argv,
                                                   os.environ)
        validated(config)  # fail on a bad setting before binding anything
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(host, port, config, api_keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
