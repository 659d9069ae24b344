"""Prefix-aware routing (issue 15): what a request is keyed by, and where a key goes, on
constructed cases. Pure."""

from __future__ import annotations

from collections import Counter

import pytest

from services.gateway.balancer import Balancer, RouteHint
from services.gateway.nodes import NodeView
from services.gateway.prefix_routing import choose, route_key

SYSTEM = {"role": "system", "content": "You are the help desk of ACME. " * 40}


def chat(*turns: str, **extra: object) -> dict[str, object]:
    messages: list[dict[str, str]] = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages, **extra}


def nodes(count: int, **load: float) -> list[NodeView]:
    return [NodeView(f"node-{i}", "m", f"http://n{i}", "local", waiting=load.get(f"n{i}", 0))
            for i in range(count)]


def test_a_conversation_keeps_its_key_turn_after_turn_and_users_differ() -> None:
    first = route_key("chat", chat("My printer is on fire."), "t1")
    later = route_key("chat", chat("My printer is on fire.", "Unplug it.", "Done. Now?"), "t1")
    other_user = route_key("chat", chat("How do I reset my password?"), "t1")
    assert first is not None and first == later
    assert other_user != first  # same system prompt, another conversation: spread out


def test_a_long_shared_system_prompt_keys_every_conversation_on_it_alike() -> None:
    """Past PREFIX_BYTES of system prompt, the users of one app share its key: they go where
    it is cached, and load spreads them when there are too many."""
    long = {"role": "system", "content": "You are the legal assistant of ACME. " * 200}
    keys = {route_key("chat", {"messages": [long, {"role": "user", "content": f"q{i}"}]}, "t1")
            for i in range(5)}
    assert len(keys) == 1


def test_a_tenant_never_shares_a_key_with_another() -> None:
    """The same prompt from two tenants: their nodes' caches are salted apart anyway, and
    routing must not pretend otherwise."""
    assert route_key("chat", chat("hi"), "t1") != route_key("chat", chat("hi"), "t2")
    assert route_key("chat", chat(user="u-7"), "t1") != route_key("chat", chat(user="u-7"), "t2")


def test_a_named_session_keys_the_request_whatever_its_prompt() -> None:
    by_user = route_key("chat", chat("a", user="alice"), "t1")
    assert by_user == route_key("chat", chat("something else", user="alice"), "t1")
    by_header = route_key("chat", chat("a"), "t1", session="alice")
    assert by_header == by_user  # the header and the `user` field name the same session
    assert route_key("chat", chat("a"), "t1", session="x" * 10_000) == \
        route_key("chat", chat("b"), "t1", session="x" * 256)  # bounded


def test_completions_and_responses_are_keyed_by_their_prompts_start() -> None:
    long = "Context: " + "lorem ipsum " * 1000
    assert route_key("completions", {"prompt": long + "Q1"}, "t") == \
        route_key("completions", {"prompt": long + "Q2"}, "t")  # past the first 4 KiB
    assert route_key("completions", {"prompt": ["a", "b"]}, "t") == \
        route_key("completions", {"prompt": "a"}, "t")
    assert route_key("responses", {"instructions": "Be brief.", "input": "hi"}, "t") != \
        route_key("responses", {"instructions": "Be brief.", "input": "ho"}, "t")
    assert route_key("embeddings", {"input": "x"}, "t") is None
    assert route_key("chat", {"messages": []}, "t") is None


def test_a_key_goes_to_the_same_node_from_any_gateway_and_spreads_over_keys() -> None:
    fleet = nodes(8)
    keys = [route_key("chat", chat(f"user {i}"), "t1") for i in range(400)]
    a, b = Balancer("prefix_aware"), Balancer("prefix_aware")
    picks = [a.choose("m", fleet, 0.0, hint=RouteHint(k)) for k in keys]
    assert picks == [b.choose("m", list(reversed(fleet)), 0.0, hint=RouteHint(k)) for k in keys]
    spread = Counter(n.node_id for n in picks if n is not None)
    assert len(spread) == 8 and max(spread.values()) < 3 * min(spread.values())


def test_a_node_leaving_moves_only_its_own_keys() -> None:
    fleet = nodes(8)
    keys = [route_key("chat", chat(f"user {i}"), "t1") for i in range(400)]
    before = {k: choose(k, fleet, {}, 0.25).node_id for k in keys if k}
    gone = fleet[3].node_id
    after = {k: choose(k, [n for n in fleet if n.node_id != gone], {}, 0.25).node_id
             for k in before}
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)


def test_a_hot_key_spills_to_its_next_node_past_the_load_bound() -> None:
    fleet = nodes(4)
    key = route_key("chat", chat("the one everybody asks"), "t1")
    assert key is not None
    home = choose(key, fleet, {}, 0.25)
    # Its home is busy (this gateway's in-flight) while the others idle: the bound, ceil((6 +
    # 1) / 4 * 1.25) = 3, is passed, so the next node in the key's order takes it.
    second = choose(key, fleet, {home.node_id: 6}, 0.25)
    assert second.node_id != home.node_id
    assert choose(key, fleet, {home.node_id: 6, second.node_id: 6}, 0.25).node_id not in \
        {home.node_id, second.node_id}
    # The nodes' own queues (heartbeats) count as load too.
    queued = [NodeView(n.node_id, "m", n.endpoint_url, "local",
                       waiting=6 if n.node_id == home.node_id else 0) for n in fleet]
    assert choose(key, queued, {}, 0.25).node_id != home.node_id


def test_without_a_key_prefix_aware_goes_by_load_and_respects_the_breaker() -> None:
    fleet = nodes(3, n0=5, n1=0, n2=9)
    balancer = Balancer("prefix_aware")
    assert balancer.keyed
    chosen = balancer.choose("m", fleet, 0.0)
    assert chosen is not None and chosen.node_id == "node-1"  # least_load
    key = route_key("chat", chat("x"), "t1")
    home = balancer.choose("m", nodes(3), 0.0, hint=RouteHint(key))
    assert home is not None
    others = balancer.choose("m", nodes(3), 0.0, exclude=frozenset({home.node_id}),
                            hint=RouteHint(key))
    assert others is not None and others.node_id != home.node_id  # a retry goes elsewhere
    with pytest.raises(ValueError, match="spill"):
        Balancer("prefix_aware", spill=-1)
