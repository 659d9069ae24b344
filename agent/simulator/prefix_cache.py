"""vLLM's automatic prefix caching, as far as anyone outside the engine can see it. Pure.

A prompt's tokens are cut into full blocks of `block_size`; each block is known by a hash of
its tokens chained to the hash of the block before it, and the first block's hash also takes
the request's ``cache_salt`` (as vLLM mixes it into the first block's extra keys). A request
hits the blocks of its longest cached prefix, then caches all of its own, least recently used
going first when the cache is full. So two requests share cached blocks only when their
prompts start alike *and* their salts are equal: what `vllm:prefix_cache_hits` shows, and what
lets a gateway keep tenants from timing each other's prompts.

Simplified: the cache is as large as the KV cache and never competes with running sequences.
"""

from __future__ import annotations

import collections

from agent.simulator.tokenizer import tokenize

__all__ = ["PrefixCache"]


class PrefixCache:
    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        self.capacity = max(1, capacity_blocks)
        self.block_size = block_size
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def reset(self) -> None:
        """Forget every block (vLLM's `POST /reset_prefix_cache`)."""
        self._blocks.clear()

    def query(self, salt: str | None, prompt: str) -> tuple[int, int]:
        """(tokens queried, tokens hit) for a prompt whose text is `prompt`; its blocks are
        cached from now on."""
        tokens = tokenize(prompt)
        size = self.block_size
        full = len(tokens) - len(tokens) % size
        blocks = self._blocks
        parent: int = hash(("salt", salt))
        hit = 0
        missed = False
        for start in range(0, full, size):
            parent = hash((parent, *tokens[start:start + size]))
            if not missed and parent in blocks:
                hit += size
                blocks.move_to_end(parent)
                continue
            missed = True
            blocks[parent] = None
            blocks.move_to_end(parent)
            if len(blocks) > self.capacity:
                blocks.popitem(last=False)
        return len(tokens), hit
