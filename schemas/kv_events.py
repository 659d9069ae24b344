"""vLLM's KV cache events (`vllm.distributed.kv_events`), as a node's agent forwards them on
``node.kv_events.<node id>`` (core NATS) and a gateway reads them for `kv_aware` routing.

The shape is vLLM's own: a `KVEventBatch` encoded with msgpack, each event a map tagged by
``type`` (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`). vLLM publishes them on ZeroMQ
(``--kv-events-config``); the agent relays each batch unchanged when it is small enough,
split into batches of whole events when it is not.

Decoding is bounded: a batch's every list has a ceiling (`decode_batch` refuses more), so a
node can make a gateway hold no more than its index's own limits allow. A block's hash is
vLLM's (`ExternalBlockHash`: an int, or bytes under a hash algorithm that keeps them), only
an opaque name: what a block holds is told by its token ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

__all__ = [
    "MAX_BLOCKS_PER_EVENT",
    "MAX_EVENTS_PER_BATCH",
    "MAX_TOKENS_PER_EVENT",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventBatch",
    "KvEventDecodeError",
    "decode_batch",
    "encode_batch",
]

MAX_EVENTS_PER_BATCH: Final = 4096
MAX_BLOCKS_PER_EVENT: Final = 2048
MAX_TOKENS_PER_EVENT: Final = 65536
MAX_BLOCK_SIZE: Final = 1024

BlockHash = int | Annotated[bytes, msgspec.Meta(max_length=64)]


class EventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Tagged by class name under ``type``, as vLLM's are."""


class BlockStored(KVCacheEvent, omit_defaults=False):
    """Full blocks newly cached, in order: `block_hashes[i]` holds
    `token_ids[i*block_size:(i+1)*block_size]`, and the first follows `parent_block_hash`
    (None: it starts a prompt). `extra_keys[i]` (vLLM 0.11+) are what else went into block
    i's hash: the request's ``cache_salt`` for a prompt's first block. Every field is
    encoded, null or not: vLLM's own class requires `lora_id`, `medium` and `lora_name`."""

    block_hashes: Annotated[list[BlockHash], msgspec.Meta(max_length=MAX_BLOCKS_PER_EVENT)]
    parent_block_hash: BlockHash | None
    token_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_TOKENS_PER_EVENT)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)]
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Annotated[list[list[Any] | None],
                          msgspec.Meta(max_length=MAX_BLOCKS_PER_EVENT)] | None = None


class BlockRemoved(KVCacheEvent, omit_defaults=False):
    """Blocks evicted (their hashes)."""

    block_hashes: Annotated[list[BlockHash], msgspec.Meta(max_length=MAX_BLOCKS_PER_EVENT)]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The whole cache dropped (vLLM's ``/reset_prefix_cache``)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    events: Annotated[list[KVEvent], msgspec.Meta(max_length=MAX_EVENTS_PER_BATCH)]


class KvEventDecodeError(ValueError):
    pass


_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_encoder = msgspec.msgpack.Encoder()


def decode_batch(data: bytes) -> KVEventBatch:
    """A batch as vLLM encodes it; KvEventDecodeError for anything else, or one over the
    bounds, or a stored event whose token ids are not its blocks' (len = blocks x size)."""
    try:
        batch = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KvEventDecodeError(str(exc)) from None
    for event in batch.events:
        if isinstance(event, BlockStored) and (
                len(event.token_ids) != len(event.block_hashes) * event.block_size
                or (event.extra_keys is not None
                    and len(event.extra_keys) != len(event.block_hashes))):
            raise KvEventDecodeError("a BlockStored's token ids or extra keys do not match "
                                     "its blocks")
    return batch


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)
