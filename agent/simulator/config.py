"""The simulator's settings and its injectable faults (msgspec Structs, validated on use)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


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


class ConfigError(ValueError):
    """A setting is out of range; the message names it."""


def validated(config: SimulatorConfig) -> SimulatorConfig:
    """The same config, after checking the constraints a plain constructor call skips."""
    try:
        return msgspec.convert(msgspec.to_builtins(config), SimulatorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from exc


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
