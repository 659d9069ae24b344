"""kv_aware routing (issue 15): the index built from nodes' KV events, a prompt's blocks as
the gateway names them, and the choice, on constructed cases. Pure."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import msgspec
import pytest

from agent.kv_events import split_batch
from schemas.events import NodeDraining
from schemas.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KvEventDecodeError,
    decode_batch,
)
from services.domain.standin_tokenizer import TokenIds
from services.gateway import kv_routing, prefix_routing
from services.gateway.balancer import Balancer, RouteHint
from services.gateway.kv_index import ROOT, KvIndex, block_key
from services.gateway.kv_prompt import PromptBlocks
from services.gateway.nodes import NodeTable, NodeView

BLOCK = 16
SYSTEM = {"role": "system", "content": "You are the help desk of ACME. Be brief. " * 30}


def chat(*turns: str) -> dict[str, object]:
    messages: list[dict[str, str]] = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


class Engine:
    """What a node's vLLM reports: its own block hashes (any numbering will do: the index
    must not depend on them), salted first blocks, in vLLM's event shape."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.hashes: dict[tuple[object, ...], int] = {}

    def store(self, body: dict[str, object], salt: str) -> BlockStored:
        messages = body["messages"]
        assert isinstance(messages, list)
        ids = TokenIds().chat_prompt([(m["role"], m["content"]) for m in messages])
        full = len(ids) - len(ids) % BLOCK
        hashes: list[BlockHash] = []
        parent: int | None = None
        for start in range(0, full, BLOCK):
            chain = (parent, salt if start == 0 else None, *ids[start:start + BLOCK])
            parent = self.hashes.setdefault(chain, self.offset + len(self.hashes))
            hashes.append(parent)
        return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=ids[:full],
                           block_size=BLOCK, medium="GPU",
                           extra_keys=[[salt]] + [None] * (len(hashes) - 1))


def keys(body: dict[str, object], salt: str) -> list[bytes]:
    return list(PromptBlocks().keys("chat", body, salt, BLOCK))


def node(name: str, **state: float) -> NodeView:
    return NodeView(name, "m", f"http://{name}", "local", **state)  # type: ignore[arg-type]


def test_a_prompt_matches_the_blocks_a_node_reported_for_it() -> None:
    index = KvIndex()
    body = chat("My printer is on fire.")
    index.apply("a", [Engine(0).store(body, "t1")])
    prompt = keys(body, "t1")
    assert index.overlaps(prompt, ["a", "b"]) == {"a": len(prompt)}
    # A later turn repeats the conversation: all of its earlier blocks match.
    later = keys(chat("My printer is on fire.", "Unplug it.", "Done."), "t1")
    assert index.overlaps(later, ["a"])["a"] >= len(prompt) - 1
    assert index.blocks("a") == len(prompt) and index.block_size("a") == BLOCK


def test_a_tenant_never_matches_another_tenants_cache() -> None:
    index = KvIndex()
    body = chat("hi")
    index.apply("a", [Engine(0).store(body, "t1")])
    assert index.overlaps(keys(body, "t2"), ["a"]) == {}
    assert index.overlaps(keys(body, "t1"), ["a"]) != {}


def test_removed_blocks_cut_the_match_and_a_cleared_cache_matches_nothing() -> None:
    index, engine = KvIndex(), Engine(0)
    body = chat("question")
    stored = engine.store(body, "t1")
    index.apply("a", [stored])
    index.apply("a", [BlockRemoved(block_hashes=stored.block_hashes[3:])])
    assert index.overlaps(keys(body, "t1"), ["a"]) == {"a": 3}
    index.apply("a", [AllBlocksCleared()])
    assert index.overlaps(keys(body, "t1"), ["a"]) == {} and len(index) == 0


def test_a_run_whose_parent_is_unknown_is_not_believed() -> None:
    index = KvIndex()
    stored = Engine(0).store(chat("x"), "t1")
    tail = BlockStored(block_hashes=stored.block_hashes[2:], parent_block_hash=12345,
                       token_ids=stored.token_ids[2 * BLOCK:], block_size=BLOCK)
    index.apply("a", [tail])
    assert len(index) == 0 and index.orphans == 1


def test_each_node_remembers_at_most_its_bound_oldest_first() -> None:
    index = KvIndex(max_blocks=10)
    index.apply("a", [Engine(0).store(chat("x"), "t1")])
    assert index.blocks("a") == 10
    # The oldest (the prompt's start) went: the prompt no longer matches from its start.
    assert index.overlaps(keys(chat("x"), "t1"), ["a"]) == {}


def test_an_engine_restart_forgets_the_node() -> None:
    index = KvIndex()
    body = chat("x")
    assert index.sequence("a", 5)
    index.apply("a", [Engine(0).store(body, "t1")])
    assert index.sequence("a", 6)
    assert not index.sequence("a", 0)  # went back: a new engine, an empty cache
    assert index.overlaps(keys(body, "t1"), ["a"]) == {}


def test_a_draining_node_drops_out_of_the_index_at_once() -> None:
    index = KvIndex()
    body = chat("x")
    node_id = uuid.UUID(int=1)
    table = NodeTable(on_draining=index.forget)
    table.nodes[str(node_id)] = node(str(node_id))
    index.apply(str(node_id), [Engine(0).store(body, "t1")])
    assert index.overlaps(keys(body, "t1"), [str(node_id)])
    table.apply(NodeDraining(node_id=node_id, reason="spot"), 0.0)
    assert index.overlaps(keys(body, "t1"), [str(node_id)]) == {} and len(index) == 0


def test_the_node_holding_most_of_the_prompt_is_chosen() -> None:
    fleet = [node("a"), node("b"), node("c")]
    picked = kv_routing.choose({"a": 3, "b": 40}, b"k", fleet, {}, 0.25)
    assert picked.node_id == "b"


def test_a_full_holder_spills_to_the_next_holder_not_to_a_cold_node() -> None:
    fleet = [node("a"), node("b"), node("c"), node("d")]
    in_flight = {"b": 6, "a": 1}
    picked = kv_routing.choose({"a": 30, "b": 40}, b"k", fleet, in_flight, 0.25)
    assert picked.node_id == "a"  # b is over the bound; a holds most of the rest


def test_load_and_kv_usage_weigh_against_a_small_overlap() -> None:
    fleet = [node("a", kv_cache_usage=0.95), node("b", kv_cache_usage=0.0)]
    # a holds a little more, but is full and busy: b, holding nearly as much, wins.
    picked = kv_routing.choose({"a": 40, "b": 38}, b"k", fleet, {"a": 1}, 0.25)
    assert picked.node_id == "b"


def test_a_prompt_no_node_holds_goes_where_prefix_aware_sends_it() -> None:
    fleet = [node(f"n{i}") for i in range(5)]
    key = prefix_routing.route_key("chat", chat("new"), "t1")
    assert key is not None
    assert kv_routing.choose({}, key, fleet, {}, 0.25) == \
        prefix_routing.choose(key, fleet, {}, 0.25)
    # Nothing to key it by: the least loaded.
    assert kv_routing.choose({}, None, fleet, {"n0": 2, "n1": 1, "n2": 1, "n3": 1},
                             0.25).node_id == "n4"


def test_two_gateways_with_the_same_events_choose_alike() -> None:
    events = [Engine(0).store(chat("q"), "t1")]
    body = chat("q", "a", "q2")
    picks = []
    for order in (["a", "b", "c"], ["c", "b", "a"]):
        index = KvIndex()
        index.apply("b", events)
        index.apply("c", events)
        balancer = Balancer("kv_aware", kv_index=index)
        hint = RouteHint(b"key", lambda size: PromptBlocks().keys("chat", body, "t1", size))
        picked = balancer.choose("m", [node(n) for n in order], 0.0, hint=hint)
        assert picked is not None
        picks.append(picked.node_id)
    assert picks[0] == picks[1] and picks[0] in {"b", "c"}


def test_a_lookup_reads_the_prompt_only_as_far_as_some_node_holds_it() -> None:
    index = KvIndex()
    index.apply("a", [Engine(0).store(chat("q"), "t1")])
    read = 0

    def counting(size: int) -> Iterator[bytes]:
        nonlocal read
        for key in PromptBlocks().keys("chat", chat("q" * 5000), "t2", size):
            read += 1
            yield key

    balancer = Balancer("kv_aware", kv_index=index)
    balancer.choose("m", [node("a"), node("b")], 0.0, hint=RouteHint(None, counting))
    assert read == 1  # another tenant's prompt: its first block is nowhere


def test_prompt_blocks_are_bounded_and_read_completions_too() -> None:
    blocks = PromptBlocks(max_tokens=64)
    assert len(list(blocks.keys("chat", chat("x"), "t1", BLOCK))) == 4
    text = list(blocks.keys("completions", {"prompt": "one two three " * 20}, "t1", BLOCK))
    ids = list(blocks.keys("completions", {"prompt": [5] * 40}, "t1", BLOCK))
    assert len(text) == 3 and len(ids) == 2
    assert list(blocks.keys("embeddings", {"input": "x"}, "t1", BLOCK)) == []
    assert list(blocks.keys("chat", {"messages": "nope"}, "t1", BLOCK)) == []


def test_the_agent_splits_a_large_batch_into_messages_the_index_reads_alike() -> None:
    engine = Engine(0)
    stored = engine.store(chat("x" * 10, "y " * 6000, "z"), "t1")
    batch = KVEventBatch(ts=1.0, events=[stored, BlockRemoved(block_hashes=[10**9])])
    parts = list(split_batch(batch, max_bytes=4096))
    assert len(parts) > 2 and all(len(p) <= 4096 for p in parts)
    whole, split = KvIndex(), KvIndex()
    whole.apply("a", batch.events)
    for part in parts:
        split.apply("a", decode_batch(part).events)
    prompt = keys(chat("x" * 10, "y " * 6000, "z"), "t1")
    assert whole.overlaps(prompt, ["a"]) == split.overlaps(prompt, ["a"]) == {"a": len(prompt)}


def test_a_batch_not_in_vllms_shape_is_refused() -> None:
    bad = msgspec.msgpack.encode({"ts": 1.0, "events": [{
        "type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
        "token_ids": [1] * 17, "block_size": 16}]})
    with pytest.raises(KvEventDecodeError):
        decode_batch(bad)
    with pytest.raises(KvEventDecodeError):
        decode_batch(msgspec.msgpack.encode({"ts": 1.0, "events": [{"type": "Nope"}]}))
    with pytest.raises(KvEventDecodeError):
        decode_batch(msgspec.msgpack.encode({"ts": 1.0, "events": [{
            "type": "BlockRemoved", "block_hashes": list(range(5000))}]}))


def test_a_long_first_message_is_hashed_once_and_named_alike() -> None:
    """The blocks of a long system prompt are remembered: the keys must be the same as if
    every block were hashed anew, for any block size and whatever follows."""
    long = {"role": "system", "content": "You answer for ACME, carefully. " * 100}
    for turns in ([], [{"role": "user", "content": "hi"}],
                  [{"role": "user", "content": "x " * 400}]):
        body = {"messages": [long, *turns]}
        ids = TokenIds().chat_prompt([(m["role"], m["content"]) for m in body["messages"]])
        for size in (16, 32):
            parent, expected = ROOT, []
            for start in range(0, len(ids) - len(ids) % size, size):
                parent = block_key(parent, ids[start:start + size],
                                   ["t1"] if start == 0 else None)
                expected.append(parent)
            blocks = PromptBlocks(max_tokens=1 << 20)
            assert list(blocks.keys("chat", body, "t1", size)) == expected
            assert list(blocks.keys("chat", body, "t1", size)) == expected  # remembered
            assert list(PromptBlocks(max_tokens=64).keys("chat", body, "t1", size)) == \
                expected[:64 // size]
