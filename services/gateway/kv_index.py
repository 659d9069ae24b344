"""Which node holds which prompt blocks in its KV cache, built from the nodes' own KV events
(issue 15, `kv_aware`). Pure.

A block is named here by a hash the gateway computes itself, from what the block holds:
``block_key(parent key, its token ids, its extra keys)``, chained from `ROOT`. vLLM's own
block hashes depend on its hash algorithm and a per-process seed, so they are only used to
follow a node's events (its parent links and removals), through a map per node from its
hashes to these keys. A prompt's first block takes the request's ``cache_salt`` in its extra
keys, as vLLM's does (the gateway salts every request with its tenant): so a tenant's prompt
can only ever match blocks a node cached for that tenant.

Bounded: each node's map holds at most `max_blocks` (the oldest dropped first, as a stale
entry costs a cache hit at worst), and a lookup walks a prompt's blocks only while some
candidate still holds them: no scan of any node's index per request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from schemas.kv_events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent

__all__ = ["ROOT", "KvIndex", "block_key"]

ROOT: Final = b"crosslogic-kv-root"
_encode = msgspec.msgpack.Encoder().encode


def block_key(parent: bytes, token_ids: Sequence[int], extra: Sequence[Any] | None) -> bytes:
    """The gateway's name for a block: what it holds, after what."""
    return hashlib.blake2b(parent + _encode((token_ids, extra)), digest_size=12).digest()


@dataclass
class _Node:
    block_size: int = 0
    keys: dict[BlockHash, bytes] = field(default_factory=dict)
    """The node's block hash → the gateway's key, oldest first."""
    seq: int = -1


class KvIndex:
    def __init__(self, max_blocks: int = 1 << 16) -> None:
        self.max_blocks = max_blocks
        self._nodes: dict[str, _Node] = {}
        self._holders: dict[bytes, set[str]] = {}
        self.orphans = 0
        """Stored runs dropped because their parent was unknown (an event lost, or evicted
        from the map): their blocks would be unreachable from any prompt's start."""

    def __len__(self) -> int:
        return len(self._holders)

    def blocks(self, node_id: str) -> int:
        node = self._nodes.get(node_id)
        return 0 if node is None else len(node.keys)

    def block_size(self, node_id: str) -> int:
        node = self._nodes.get(node_id)
        return 0 if node is None else node.block_size

    def sequence(self, node_id: str, seq: int) -> bool:
        """Note the sequence number of a node's next batch; False (and the node forgotten)
        when it went back: its engine restarted, so what it held is gone."""
        node = self._nodes.get(node_id)
        restarted = node is not None and seq < node.seq
        if restarted:
            self.forget(node_id)
        self._nodes.setdefault(node_id, _Node()).seq = seq
        return not restarted

    def apply(self, node_id: str, events: Iterable[KVEvent]) -> None:
        node = self._nodes.setdefault(node_id, _Node())
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(node_id, node, event)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._drop(node_id, node.keys.pop(h, None))
            elif isinstance(event, AllBlocksCleared):
                seq = node.seq
                self.forget(node_id)
                node = self._nodes[node_id] = _Node(seq=seq)

    def _stored(self, node_id: str, node: _Node, event: BlockStored) -> None:
        if event.parent_block_hash is None:
            parent: bytes | None = ROOT
        else:
            parent = node.keys.get(event.parent_block_hash)
        if parent is None:
            self.orphans += 1
            return
        if node.block_size != event.block_size:
            if node.keys:  # a node changing its block size: what it held is not comparable
                seq = node.seq
                self.forget(node_id)
                node = self._nodes[node_id] = _Node(seq=seq)
            node.block_size = event.block_size
        size = event.block_size
        extras = event.extra_keys
        for i, h in enumerate(event.block_hashes):
            key = block_key(parent, event.token_ids[i * size:(i + 1) * size],
                            None if extras is None else extras[i])
            old = node.keys.pop(h, None)
            if old is not None and old != key:
                self._drop(node_id, old)
            node.keys[h] = key
            self._holders.setdefault(key, set()).add(node_id)
            parent = key
        while len(node.keys) > self.max_blocks:
            oldest = next(iter(node.keys))
            self._drop(node_id, node.keys.pop(oldest))

    def _drop(self, node_id: str, key: bytes | None) -> None:
        if key is None:
            return
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(node_id)
            if not holders:
                del self._holders[key]

    def forget(self, node_id: str) -> None:
        """The node left, is draining or restarted: nothing is routed by its cache again."""
        node = self._nodes.pop(node_id, None)
        if node is not None:
            for key in node.keys.values():
                self._drop(node_id, key)

    def overlaps(self, keys: Iterable[bytes], nodes: Collection[str]) -> dict[str, int]:
        """How many of a prompt's leading blocks (`keys`, in order) each of `nodes` holds.
        Stops at the first block none of them holds, so a prompt no node has seen costs one
        lookup (`keys` may be lazy: what is not read is never hashed)."""
        alive = set(nodes)
        found: dict[str, int] = {}
        depth = 0
        holders_of = self._holders.get
        for key in keys:
            holders = holders_of(key)
            if not holders:
                break
            if not alive <= holders:
                still = alive & holders
                for node_id in alive - still:
                    if depth:
                        found[node_id] = depth
                alive = still
                if not alive:
                    break
            depth += 1
        for node_id in alive:
            if depth:
                found[node_id] = depth
        return found
