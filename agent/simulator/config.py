"""The simulator's settings and its injectable faults (msgspec Structs, validated on use)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.kv_events import MAX_BLOCK_SIZE

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Endpoint = Annotated[str, msgspec.Meta(pattern=r"^(tcp|ipc|inproc)://\S+$")]


class Faults(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What to break. Changed at run time through ``/admin/faults``; each request reads the
    faults once, when it arrives."""

    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Fraction of generation/embedding requests answered with a 500 in vLLM's error shape."""
    slow_seconds: NonNegative = 0.0
    """Extra delay before the first token (on top of the time to first token)."""
    hang_after_tokens: Count | None = None
    """After this many tokens nothing more is sent, but the connection stays open."""
    drop_after_tokens: Count | None = None
    """After this many tokens the connection is cut (no end of stream, no [DONE])."""
    health_503: bool = False
    """`GET /health` answers 503, as vLLM does when its engine is dead."""
    exit: bool = False
    """Setting it makes the process exit at once with a non-zero code, as a crash."""


class SimulatorConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One simulated `vllm serve` process serving one model."""

    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    max_model_len: Positive = 8192
    time_to_first_token: NonNegative = 0.0
    """Seconds from admission (a free sequence slot) to the first token."""
    inter_token_latency: NonNegative = 0.0
    """Seconds between two tokens of a sequence decoding alone (a decode step at batch 1)."""
    prefill_tokens_per_second: NonNegative = 0.0
    """Prompt tokens not found in the prefix cache that the GPU prefills a second, one request
    after another (0: prefill takes no time; agent/simulator/timing.py)."""
    decode_seconds_per_seq: NonNegative = 0.0
    """What each other running sequence adds to a decode step (0: the batch does not slow
    decoding)."""
    max_num_seqs: Positive = 256
    """Sequences running at once; more wait in a FIFO queue (vLLM's --max-num-seqs)."""
    kv_cache_tokens: Positive = 65536
    """KV-cache capacity in tokens: the denominator of `vllm:kv_cache_usage_perc`."""
    block_size: Positive = 16
    """KV-cache block size in tokens (vLLM's default on GPUs)."""
    embedding_dimensions: Positive = 384
    seed: int = 0
    """Mixed into every generated text and into the fault dice, so two servers with different
    seeds answer differently."""
    faults: Faults = msgspec.field(default_factory=Faults)
    kv_events_endpoint: Endpoint | None = None
    """Where KV cache events are published on ZeroMQ, as vLLM's ``--kv-events-config``
    endpoint (bound when it has ``*`` or ``::`` or is ``ipc://``/``inproc://``, else
    connected); None: none are published."""
    kv_events_topic: str = ""
    """The first frame of every message (vLLM's default: empty)."""


class KVEventsConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The JSON of vLLM's ``--kv-events-config`` (vllm/config/kv_events.py). Only the ZMQ
    publisher is simulated, without a replay socket; its buffer and queue sizes are accepted
    and not used."""

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None
    """vLLM's default: ``zmq`` when events are enabled, else ``null``."""
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: Positive = 10_000
    hwm: Count = 100_000
    max_queue_size: Positive = 100_000
    topic: str = ""


class ConfigError(ValueError):
    """A setting is out of range; the message names it."""


def validated(config: SimulatorConfig) -> SimulatorConfig:
    """The same config, after checking the constraints a plain constructor call skips."""
    try:
        checked = msgspec.convert(msgspec.to_builtins(config), SimulatorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from exc
    if checked.kv_events_endpoint is not None and checked.block_size > MAX_BLOCK_SIZE:
        raise ConfigError(f"block_size must be at most {MAX_BLOCK_SIZE} to publish KV cache "
                          "events")
    return checked


def kv_events_settings(text: str) -> tuple[str | None, str]:
    """(endpoint or None, topic) from the JSON of ``--kv-events-config``; ConfigError when it
    is not one vLLM would take, or asks for what is not simulated."""
    try:
        flag = msgspec.json.decode(text, type=KVEventsConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"--kv-events-config: {exc}") from exc
    if flag.replay_endpoint is not None:
        raise ConfigError("--kv-events-config: replay_endpoint is not simulated")
    publisher = flag.publisher or ("zmq" if flag.enable_kv_cache_events else "null")
    if not flag.enable_kv_cache_events or publisher == "null":
        return None, flag.topic
    return flag.endpoint, flag.topic


def merge_faults(current: Faults, patch: Any) -> Faults:
    """`current` with the fields of the JSON object `patch` replaced; raises ConfigError on an
    unknown field, a wrong type or a value out of range."""
    if not isinstance(patch, dict):
        raise ConfigError("faults must be a JSON object")
    merged = msgspec.structs.asdict(current) | patch
    try:
        return msgspec.convert(merged, Faults)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from exc
