"""The Responses API as the gateway reads it: requests, the typed event stream, usage in
every vLLM answer's own words, and where stored responses are (pure)."""

from __future__ import annotations

import msgspec
import pytest

from services.gateway.node_answers import answer_of
from services.gateway.protocol import BadRequest, upstream_body
from services.gateway.request_parsing import MAX_RESPONSE_ID, parse_request
from services.gateway.response_owners import Owner, decode_owner, encode_owner
from services.gateway.responses import ResponsesStreamMeter


def parse(body: dict[str, object], endpoint: str = "responses", **kw: object):  # type: ignore[no-untyped-def]
    return parse_request(msgspec.json.encode(body), endpoint, default_reserved=100,
                         cache_salt="tenant-1", **kw)  # type: ignore[arg-type]


def event(kind: str, **fields: object) -> bytes:
    return b"data: " + msgspec.json.encode({"type": kind, **fields}) + b"\n"


def test_a_response_request_reserves_its_output_bound_and_is_salted() -> None:
    req = parse({"model": "m", "input": "x" * 400, "max_output_tokens": 50})
    assert req.reserved_tokens == 400 // 4 + 8 + 50
    assert req.store and req.previous_response_id is None
    assert msgspec.json.decode(upstream_body(req))["cache_salt"] == "tenant-1"
    unbounded = parse({"model": "m", "input": "hi"}, context_length=lambda m: 60)
    assert unbounded.reserved_tokens == 2 // 4 + 8 + 60  # the default, cut to the context


def test_a_responses_stream_is_sent_as_asked_without_chat_stream_options() -> None:
    req = parse({"model": "m", "input": "hi", "stream": True})
    body = msgspec.json.decode(upstream_body(req))
    assert "stream_options" not in body and body["stream"] is True


def test_max_output_tokens_is_bounded_by_the_context() -> None:
    with pytest.raises(BadRequest) as err:
        parse({"model": "m", "input": "hi", "max_output_tokens": 10**30},
              context_length=lambda m: 4096)
    assert err.value.param == "max_output_tokens"
    assert "10000000000000000000000000000" not in err.value.message  # quoted cut short


def test_store_false_is_the_only_way_out_of_storing() -> None:
    assert not parse({"model": "m", "input": "hi", "store": False}).store
    assert parse({"model": "m", "input": "hi", "store": None}).store


@pytest.mark.parametrize("bad", [5, "", "resp/../x", "r" * (MAX_RESPONSE_ID + 1), "résumé",
                                 ["resp_1"]])
def test_a_previous_response_id_that_cannot_be_one_is_a_400(bad: object) -> None:
    with pytest.raises(BadRequest) as err:
        parse({"model": "m", "input": "hi", "previous_response_id": bad})
    assert err.value.param == "previous_response_id"


def test_a_previous_response_id_is_kept() -> None:
    assert parse({"model": "m", "input": "hi",
                  "previous_response_id": "resp_0a1b"}).previous_response_id == "resp_0a1b"


@pytest.mark.parametrize("endpoint", ["rerank", "score", "tokenize", "detokenize"])
def test_what_only_answers_whole_cannot_stream(endpoint: str) -> None:
    with pytest.raises(BadRequest, match="cannot be streamed"):
        parse({"model": "m", "stream": True}, endpoint)


def test_rerank_and_score_inputs_are_bounded() -> None:
    with pytest.raises(BadRequest) as err:
        parse({"model": "m", "query": "q", "documents": ["d"] * 3}, "rerank", max_inputs=2)
    assert err.value.param == "documents"
    with pytest.raises(BadRequest) as err:
        parse({"model": "m", "text_1": "q", "text_2": ["d"] * 3}, "score", max_inputs=2)
    assert err.value.param == "text_2"
    assert parse({"model": "m", "query": "q", "documents": ["d"] * 2}, "rerank",
                 max_inputs=2).cache_salt is None  # no prefix cache to keep apart


@pytest.mark.parametrize(("body", "expected"), [
    ({"id": "resp_1", "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}},
     ((7, 3), "resp_1")),
    ({"id": "rerank-1", "usage": {"total_tokens": 12}}, ((12, 0), "rerank-1")),
    ({"usage": {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}},
     ((4, 0), None)),
    ({"count": 3, "tokens": [1, 2, 3], "max_model_len": 8}, ((0, 0), None)),
    ({"usage": {"prompt_tokens": "many"}}, ((0, 0), None)),
])
def test_usage_in_each_answers_own_words(body: object, expected: object) -> None:
    assert answer_of(msgspec.json.encode(body)) == expected


def test_the_stream_meter_reads_the_id_first_and_the_usage_last() -> None:
    m = ResponsesStreamMeter()
    created = event("response.created", sequence_number=0,
                    response={"id": "resp_9", "status": "in_progress", "usage": None})
    assert m.feed(b"event: response.created\n") == b"event: response.created\n"
    assert m.feed(created) == created
    assert m.response_id == "resp_9" and not m.done
    # A delta whose text names an event type does not fool it.
    delta = event("response.output_text.delta", delta='"response.completed"', sequence_number=1)
    assert m.feed(delta) == delta and not m.done
    final = event("response.completed", sequence_number=2, response={
        "id": "resp_9", "usage": {"input_tokens": 11, "output_tokens": 5, "total_tokens": 16}})
    assert m.feed(final) == final
    assert m.done and (m.prompt_tokens, m.completion_tokens) == (11, 5)


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_an_unfinished_response_still_ends_the_stream_with_its_usage(kind: str) -> None:
    m = ResponsesStreamMeter()
    m.feed(event(kind, response={"id": "r", "usage": {"input_tokens": 2, "output_tokens": 1}}))
    assert m.done and (m.prompt_tokens, m.completion_tokens) == (2, 1)


def test_garbage_in_a_stream_is_forwarded_and_counts_nothing() -> None:
    m = ResponsesStreamMeter()
    for line in (b'data: {"type": "response.completed", \n', b"data: [1, 2]\n", b": ping\n"):
        assert m.feed(line) == line
    assert not m.done and (m.prompt_tokens, m.completion_tokens) == (0, 0)


def test_an_owner_round_trips_and_anything_else_is_nobody() -> None:
    owner = Owner("tenant", "node")
    assert decode_owner(encode_owner(owner)) == owner
    for junk in (None, b"", b"one", b"a b c", b" b"):
        assert decode_owner(junk) is None
