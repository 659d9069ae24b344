"""Which requests run: at most `max_num_seqs` sequences, the rest in a FIFO queue, and the
KV-cache blocks they hold. Pure bookkeeping, no asyncio: the engine awaits, this decides.

- A request needs one sequence per choice (``n``, times the number of prompts); one needing
  more than `max_num_seqs` is treated as needing all of them.
- It is admitted when its sequences fit and the KV cache has blocks for its prompt, in arrival
  order: a request that does not fit blocks the ones behind it, as vLLM's FCFS policy does.
  A request alone on an idle engine is always admitted, so an oversized one cannot wedge it.
- Blocks: ``ceil(tokens / block_size)`` per sequence, prompt plus tokens generated so far,
  without prefix sharing. Usage past capacity (vLLM would preempt) is reported as 1.0.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Running:
    seqs: int
    blocks: int


@dataclass(slots=True)
class _Waiting:
    seqs: int
    prompt_tokens: int


class Scheduler:
    def __init__(self, max_num_seqs: int, kv_cache_tokens: int, block_size: int = 16) -> None:
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.total_blocks = max(1, kv_cache_tokens // block_size)
        self._running: dict[int, _Running] = {}
        self._waiting: OrderedDict[int, _Waiting] = OrderedDict()
        self._running_seqs = 0
        self._waiting_seqs = 0
        self._used_blocks = 0

    # ------------------------------------------------------------------ what metrics read

    @property
    def num_running(self) -> int:
        """Sequences running (`vllm:num_requests_running`)."""
        return self._running_seqs

    @property
    def num_waiting(self) -> int:
        """Sequences waiting (`vllm:num_requests_waiting`)."""
        return self._waiting_seqs

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV-cache blocks in use, 0..1 (`vllm:kv_cache_usage_perc`)."""
        return min(1.0, self._used_blocks / self.total_blocks)

    def is_running(self, request_id: int) -> bool:
        return request_id in self._running

    # ------------------------------------------------------------------ changes

    def blocks_for(self, seqs: int, tokens: int) -> int:
        return seqs * -(-tokens // self.block_size)

    def submit(self, request_id: int, seqs: int, prompt_tokens: int) -> bool:
        """Queue a request; True when it runs at once, False when it waits its turn."""
        seqs = max(1, min(seqs, self.max_num_seqs))
        if not self._waiting and self._fits(seqs, prompt_tokens):
            self._start(request_id, seqs, prompt_tokens)
            return True
        self._waiting[request_id] = _Waiting(seqs, prompt_tokens)
        self._waiting_seqs += seqs
        return False

    def grow(self, request_id: int, tokens_per_seq: int) -> None:
        """A running request's sequences now hold `tokens_per_seq` tokens each."""
        running = self._running.get(request_id)
        if running is None:
            return
        blocks = self.blocks_for(running.seqs, tokens_per_seq)
        if blocks > running.blocks:
            self._used_blocks += blocks - running.blocks
            running.blocks = blocks

    def finish(self, request_id: int) -> list[int]:
        """The request is done, aborted or gone while waiting; returns the requests this
        admits, in order."""
        running = self._running.pop(request_id, None)
        if running is not None:
            self._running_seqs -= running.seqs
            self._used_blocks -= running.blocks
        else:
            waiting = self._waiting.pop(request_id, None)
            if waiting is None:
                return []
            self._waiting_seqs -= waiting.seqs
        return self._admit_waiting()

    # ------------------------------------------------------------------ internals

    def _fits(self, seqs: int, prompt_tokens: int) -> bool:
        if not self._running:
            return True
        return (self._running_seqs + seqs <= self.max_num_seqs
                and self._used_blocks + self.blocks_for(seqs, prompt_tokens)
                <= self.total_blocks)

    def _start(self, request_id: int, seqs: int, prompt_tokens: int) -> None:
        blocks = self.blocks_for(seqs, prompt_tokens)
        self._running[request_id] = _Running(seqs, blocks)
        self._running_seqs += seqs
        self._used_blocks += blocks

    def _admit_waiting(self) -> list[int]:
        admitted: list[int] = []
        while self._waiting:
            request_id, head = next(iter(self._waiting.items()))
            if not self._fits(head.seqs, head.prompt_tokens):
                break
            del self._waiting[request_id]
            self._waiting_seqs -= head.seqs
            self._start(request_id, head.seqs, head.prompt_tokens)
            admitted.append(request_id)
        return admitted
