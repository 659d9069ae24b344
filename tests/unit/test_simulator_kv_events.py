"""The simulator's KV cache events: what the prefix cache records (vLLM's BlockStored,
BlockRemoved, AllBlocksCleared), how they are numbered and framed for ZeroMQ, how
``--kv-events-config`` is read, and which token ids a request is cached under (pure)."""

from __future__ import annotations

import msgspec
import pytest

from agent.simulator.__main__ import config_from
from agent.simulator.config import ConfigError, SimulatorConfig, kv_events_settings, validated
from agent.simulator.kv_cache import completion_ids
from agent.simulator.kv_publisher import BatchFramer, binds
from agent.simulator.prefix_cache import PrefixCache
from schemas.kv_events import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from services.domain.standin_tokenizer import TokenIds

ROOT = 777


def ids(n: int, start: int = 5000) -> list[int]:
    return list(range(start, start + n))


def recording(capacity: int = 100, block_size: int = 16, **kw: int) -> PrefixCache:
    return PrefixCache(capacity, block_size, root_hash=ROOT, record_events=True, **kw)


def test_new_blocks_are_one_block_stored_with_their_ids_and_the_salt_on_the_first() -> None:
    cache = recording()
    prompt = ids(40)
    cache.query("tenant-a", prompt)
    hashes = cache.hashes("tenant-a", prompt)
    assert cache.drain_events() == [BlockStored(
        block_hashes=hashes, parent_block_hash=None, token_ids=prompt[:32], block_size=16,
        lora_id=None, medium="GPU", lora_name=None, extra_keys=[["tenant-a"], None])]
    assert cache.drain_events() == []
    cache.query("tenant-a", prompt)  # all hit: nothing new
    assert cache.drain_events() == []
    longer = [*prompt, *ids(30, 9000)]  # 70 ids: 2 more full blocks after the cached two
    cache.query("tenant-a", longer)
    [stored] = cache.drain_events()
    assert isinstance(stored, BlockStored)
    assert stored.parent_block_hash == hashes[-1]
    assert stored.block_hashes == cache.hashes("tenant-a", longer)[2:]
    assert stored.token_ids == longer[32:64] and stored.extra_keys == [None, None]


def test_an_unsalted_prompt_has_no_extra_keys() -> None:
    cache = recording()
    cache.query(None, ids(32))
    [stored] = cache.drain_events()
    assert isinstance(stored, BlockStored) and stored.extra_keys == [None, None]


def test_evictions_are_block_removed_before_the_blocks_stored() -> None:
    cache = recording(capacity=3, block_size=4)
    a = ids(12)
    a_hashes = cache.hashes(None, a)
    cache.query(None, a)
    cache.drain_events()
    cache.query(None, ids(8, 9000))
    events = cache.drain_events()
    assert events[:2] == [BlockRemoved(block_hashes=[a_hashes[2]], medium="GPU"),
                          BlockRemoved(block_hashes=[a_hashes[1]], medium="GPU")]
    assert isinstance(events[2], BlockStored) and len(events) == 3


def test_a_reset_is_all_blocks_cleared() -> None:
    cache = recording()
    cache.query(None, ids(32))
    cache.reset()
    assert cache.drain_events()[-1] == AllBlocksCleared()


def test_events_are_kept_only_when_recorded_and_then_bounded() -> None:
    silent = PrefixCache(100, 4, root_hash=ROOT)
    silent.query(None, ids(8))
    silent.reset()
    assert silent.drain_events() == []
    bounded = recording(block_size=4, max_pending_events=2)
    for start in (100, 200, 300):
        bounded.query(None, ids(4, start))
    events = bounded.drain_events()
    assert len(events) == 2 and bounded.dropped_events == 1
    assert isinstance(events[0], BlockStored) and events[0].token_ids == ids(4, 200)


def test_a_huge_prompt_is_stored_in_events_within_the_schemas_bounds() -> None:
    cache = recording(capacity=10_000, block_size=1)
    prompt = ids(MAX_BLOCKS_PER_EVENT + 10)
    cache.query("s", prompt)
    events = cache.drain_events()
    batch = decode_batch(encode_batch(KVEventBatch(ts=0.0, events=events)))
    stored = [e for e in batch.events if isinstance(e, BlockStored)]
    assert [len(e.block_hashes) for e in stored] == [MAX_BLOCKS_PER_EVENT, 10]
    assert stored[1].parent_block_hash == stored[0].block_hashes[-1]
    assert stored[0].token_ids + stored[1].token_ids == prompt
    assert stored[0].extra_keys is not None and stored[0].extra_keys[0] == ["s"]
    assert stored[1].extra_keys == [None] * 10


def test_batches_are_numbered_from_zero_and_framed_as_vllm_sends_them() -> None:
    framer = BatchFramer("kv-events")
    assert list(framer.frames([], 1.0)) == []
    events = [AllBlocksCleared()] * (MAX_EVENTS_PER_BATCH + 1)
    messages = list(framer.frames(events, 1.5))
    assert [(topic, int.from_bytes(seq, "big"), len(seq)) for topic, seq, _ in messages] == [
        (b"kv-events", 0, 8), (b"kv-events", 1, 8)]
    first = decode_batch(messages[0][2])
    assert first.ts == 1.5 and first.data_parallel_rank == 0
    assert len(first.events) == MAX_EVENTS_PER_BATCH
    assert len(decode_batch(messages[1][2]).events) == 1
    raw = msgspec.msgpack.decode(messages[1][2])
    assert raw["events"] == [{"type": "AllBlocksCleared"}]
    assert [int.from_bytes(m[1], "big") for m in framer.frames(events[:1], 2.0)] == [2]


@pytest.mark.parametrize(("endpoint", "bound"), [
    ("tcp://*:5557", True), ("tcp://[::]:5557", True), ("ipc:///tmp/kv", True),
    ("inproc://kv", True), ("tcp://127.0.0.1:5557", False), ("tcp://router:5557", False)])
def test_an_endpoint_is_bound_or_connected_as_vllm_does(endpoint: str, bound: bool) -> None:
    assert binds(endpoint) is bound


def test_the_flag_takes_vllms_json() -> None:
    vllm = ('{"enable_kv_cache_events": true, "publisher": "zmq", '
            '"endpoint": "tcp://*:5557", "topic": "kv-events"}')
    assert kv_events_settings(vllm) == ("tcp://*:5557", "kv-events")
    assert kv_events_settings('{"enable_kv_cache_events": true}') == ("tcp://*:5557", "")
    assert kv_events_settings('{"enable_kv_cache_events": false}')[0] is None
    assert kv_events_settings('{"enable_kv_cache_events": true, "publisher": "null"}')[0] is None
    assert kv_events_settings('{"enable_kv_cache_events": true, "hwm": 10, '
                              '"buffer_steps": 5, "max_queue_size": 7}')[0] == "tcp://*:5557"
    _, _, config, _ = config_from(["--kv-events-config", vllm], {})
    assert (config.kv_events_endpoint, config.kv_events_topic) == ("tcp://*:5557", "kv-events")
    env = {"SIM_KV_EVENTS_CONFIG": '{"enable_kv_cache_events": true, "endpoint": "ipc:///x"}'}
    assert config_from([], env)[2].kv_events_endpoint == "ipc:///x"
    assert config_from([], {})[2].kv_events_endpoint is None


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"enable_kv_cache_events": true, "publisher": "kafka"}',
    '{"enable_kv_cache_events": true, "unknown": 1}',
    '{"enable_kv_cache_events": true, "replay_endpoint": "tcp://*:5558"}'])
def test_a_flag_vllm_would_refuse_or_that_is_not_simulated_is_an_error(text: str) -> None:
    with pytest.raises(ConfigError):
        kv_events_settings(text)


@pytest.mark.parametrize("config", [
    SimulatorConfig(kv_events_endpoint="http://host:5557"),
    SimulatorConfig(kv_events_endpoint="tcp://"),
    SimulatorConfig(kv_events_endpoint="tcp://*:5557", block_size=2048)])
def test_a_bad_endpoint_or_block_size_is_refused(config: SimulatorConfig) -> None:
    with pytest.raises(ConfigError):
        validated(config)


def test_a_completions_prompts_are_cached_under_their_token_ids() -> None:
    t = TokenIds()
    assert completion_ids(t, "hello world") == [t.text_prompt("hello world")]
    assert completion_ids(t, ["a", "b c"]) == [t.text_prompt("a"), t.text_prompt("b c")]
    assert completion_ids(t, [5, 6, 7]) == [[5, 6, 7]]
    assert completion_ids(t, [[5, 6], [7]]) == [[5, 6], [7]]
    assert completion_ids(t, None) == []
