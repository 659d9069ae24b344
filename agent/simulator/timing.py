"""The clock of one GPU as vLLM's shows through its API: what makes time to first token depend
on the prefix cache and on load, which is what cache-aware routing is judged by. Pure (times
are passed in).

- **Prefill** takes the prompt tokens *not* found in the prefix cache, at
  `prefill_tokens_per_second`, one request after another (one GPU: a prefill waits for the
  ones before it). A prompt found whole in the cache costs nothing but the fixed
  `time_to_first_token`.
- **Decode**: each step (one token for every running sequence) takes `inter_token_latency`
  plus `decode_seconds_per_seq` for each other sequence in the batch (decode is bound by
  memory bandwidth: a bigger batch reads more KV cache per step). A request keeps the pace of
  the batch it joined.
- **Prefills mixed into decode steps** (vLLM's chunked prefill): while the GPU is prefilling,
  the steps of running sequences stretch by the prefill's share of the GPU; a request's decode
  pace includes the prefill work queued when it starts decoding, spread over its steps.

All zero (the defaults): no simulated time at all, as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GpuClock:
    prefill_tokens_per_second: float = 0.0
    inter_token_latency: float = 0.0
    decode_seconds_per_seq: float = 0.0
    prefill_free_at: float = 0.0
    """When the GPU has done every prefill queued so far (loop time)."""

    def prefill(self, now: float, uncached_tokens: int) -> float:
        """Queue a prefill of `uncached_tokens` at `now`; when it is done."""
        if self.prefill_tokens_per_second <= 0 or uncached_tokens <= 0:
            return now
        start = max(now, self.prefill_free_at)
        self.prefill_free_at = start + uncached_tokens / self.prefill_tokens_per_second
        return self.prefill_free_at

    def step(self, now: float, batch: int, steps: int) -> float:
        """The seconds between two tokens of a request decoding from `now` in a batch of
        `batch` sequences, for its `steps` tokens: the batch's step time, plus the prefill
        work still queued, spread over the steps."""
        base = self.inter_token_latency + self.decode_seconds_per_seq * max(0, batch - 1)
        if base <= 0:
            return 0.0
        backlog = max(0.0, self.prefill_free_at - now)
        return base + backlog / max(1, steps)
