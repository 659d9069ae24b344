"""vLLM's automatic prefix caching over token ids, and the KV cache events it publishes. Pure
(but for the random root hash a cache draws when given none, as vLLM does).

A prompt's token ids are cut into full blocks of `block_size`; block i is known by
``H(parent hash, block i's ids, extra keys)``, chained from a root hash (vLLM's ``NONE_HASH``,
random per process unless ``PYTHONHASHSEED`` is set), and the first block's extra keys are
``(cache_salt,)`` when the request has one (vLLM mixes the salt into the first block only). So
two requests share cached blocks only when their prompts start alike *and* their salts are
equal: what `vllm:prefix_cache_hits` shows, and what lets a gateway keep tenants from timing
each other's prompts. H is SHA-256 over the msgpack encoding of that triple, its last 8 bytes
read as a big-endian int (vLLM's int block hashes in KV events; vLLM encodes with CBOR or
pickle, so the values differ, only their shape is the same).

A request hits the blocks of its longest cached prefix, then caches all of its own full blocks.
When the cache is full the least recently used block goes first; a request's blocks are freed
tail first (vLLM frees a request's blocks in reverse order), so its last block is evicted
before its first, and a block is never evicted before a block that follows it.

With `record_events`, each change is recorded as vLLM's KV cache events (schemas.kv_events):
a `BlockRemoved` per evicted block, then one `BlockStored` for a request's newly cached blocks
(split only where the schema's bounds require), and `AllBlocksCleared` on `reset`. They wait,
at most `max_pending_events` of them (the oldest go first), until `drain_events`.

Simplified: the cache is as large as the KV cache and never competes with running sequences;
its blocks are freed as soon as the request is looked up (vLLM frees them when it finishes).
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Sequence
from typing import Final

import msgspec

from schemas.kv_events import (
    MAX_BLOCKS_PER_EVENT,
    MAX_TOKENS_PER_EVENT,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
)

__all__ = ["MEDIUM", "PENDING_EVENTS", "KvEvent", "PrefixCache", "block_hash", "none_hash"]

KvEvent = BlockStored | BlockRemoved | AllBlocksCleared
MEDIUM: Final = "GPU"
PENDING_EVENTS: Final = 10_000

_encode = msgspec.msgpack.Encoder().encode


def _hash64(value: object) -> int:
    return int.from_bytes(hashlib.sha256(_encode(value)).digest()[-8:], "big")


def block_hash(parent: int, ids: Sequence[int], extra_keys: tuple[str, ...] | None) -> int:
    """A full block's hash: its parent's (or the root's), its token ids, its extra keys."""
    return _hash64((parent, ids, extra_keys))


def none_hash(seed: str | None) -> int:
    """vLLM's ``NONE_HASH``, the root of every chain: from ``PYTHONHASHSEED`` when it is set,
    else random (so two processes hash alike only when they share the seed)."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "big")
    return _hash64(seed)


class PrefixCache:
    def __init__(self, capacity_blocks: int, block_size: int, *, root_hash: int | None = None,
                 record_events: bool = False,
                 max_pending_events: int = PENDING_EVENTS) -> None:
        self.capacity = max(1, capacity_blocks)
        self.block_size = block_size
        self.root_hash = none_hash(None) if root_hash is None else root_hash
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._events: collections.deque[KvEvent] | None = (
            collections.deque(maxlen=max(1, max_pending_events)) if record_events else None)
        self.dropped_events = 0
        """Events pushed out of a full pending list before anyone drained them."""

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def eviction_order(self) -> list[int]:
        """The cached blocks' hashes, the next to be evicted first."""
        return list(self._blocks)

    def reset(self) -> None:
        """Forget every block (vLLM's `POST /reset_prefix_cache`)."""
        self._blocks.clear()
        self._record(AllBlocksCleared())

    def hashes(self, salt: str | None, ids: Sequence[int]) -> list[int]:
        """The hashes of the prompt's full blocks (no more than the cache holds)."""
        size = self.block_size
        parent = self.root_hash
        out = []
        for b in range(min(len(ids) // size, self.capacity)):
            parent = block_hash(parent, ids[b * size:(b + 1) * size],
                                (salt,) if b == 0 and salt is not None else None)
            out.append(parent)
        return out

    def query(self, salt: str | None, ids: Sequence[int]) -> tuple[int, int]:
        """(tokens queried, tokens hit) for a prompt of token ids `ids` under `salt`; its full
        blocks are cached from now on."""
        blocks = self._blocks
        hashes = self.hashes(salt, ids)
        hits = 0
        while hits < len(hashes) and hashes[hits] in blocks:
            blocks.move_to_end(hashes[hits])  # in use: out of the eviction's way
            hits += 1
        new = len(hashes) - hits
        evicted = []
        for _ in range(len(blocks) + new - self.capacity):  # never one of the hits (see above)
            evicted.append(blocks.popitem(last=False)[0])
        for h in reversed(hashes):  # freed tail first: the tail is evicted first
            blocks[h] = None
            blocks.move_to_end(h)
        if self._events is not None:
            for h in evicted:
                self._record(BlockRemoved(block_hashes=[h], medium=MEDIUM))
            if new:
                self._stored(salt, ids, hashes, hits)
        return len(ids), hits * self.block_size

    def drain_events(self) -> list[KvEvent]:
        """The events recorded since the last drain, oldest first."""
        if not self._events:
            return []
        out = list(self._events)
        self._events.clear()
        return out

    def _stored(self, salt: str | None, ids: Sequence[int], hashes: list[int],
                first: int) -> None:
        size = self.block_size
        per = max(1, min(MAX_BLOCKS_PER_EVENT, MAX_TOKENS_PER_EVENT // size))
        for start in range(first, len(hashes), per):
            end = min(start + per, len(hashes))
            self._record(BlockStored(
                block_hashes=[*hashes[start:end]],
                parent_block_hash=hashes[start - 1] if start else None,
                token_ids=list(ids[start * size:end * size]), block_size=size, lora_id=None,
                medium=MEDIUM, lora_name=None,
                extra_keys=[[salt] if b == 0 and salt is not None else None
                            for b in range(start, end)]))

    def _record(self, event: KvEvent) -> None:
        events = self._events
        if events is None:
            return
        if len(events) == events.maxlen:
            self.dropped_events += 1
        events.append(event)
