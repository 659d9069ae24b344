"""How the gateway reads and rewrites OpenAI request bodies and vLLM's SSE streams (pure)."""

from __future__ import annotations

import msgspec
import pytest

from services.gateway.protocol import (
    BadRequest,
    StreamMeter,
    estimate_prompt_tokens,
    parse_request,
    upstream_body,
    usage_of,
)


def chunk(content: str, usage: tuple[int, int] | None, *, compact: bool = True,
          final: bool = False) -> bytes:
    body: dict[str, object] = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [] if final else [{"index": 0, "delta": {"content": content},
                                      "finish_reason": None}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": sum(usage)}
    text = msgspec.json.encode(body)
    if not compact:
        text = text.replace(b":", b": ").replace(b",", b", ")
    return b"data: " + text + b"\n"


@pytest.mark.parametrize("compact", [True, False])
def test_meter_strips_usage_for_clients_who_did_not_ask(compact: bool) -> None:
    m = StreamMeter(wants_usage=False, wants_continuous_usage=False)
    out = m.feed(chunk("Hel", (7, 1), compact=compact))
    assert b"usage" not in out and msgspec.json.decode(out[6:])["choices"][0]["delta"] == \
        {"content": "Hel"}
    m.feed(chunk("lo", (7, 2), compact=compact))
    assert (m.prompt_tokens, m.completion_tokens) == (7, 2)  # billed as delivered so far
    assert m.feed(chunk("", (7, 2), compact=compact, final=True)) == b""  # hidden
    assert m.feed(b"data: [DONE]\n") == b"data: [DONE]\n" and m.done
    assert m.chunks == 2


def test_meter_keeps_what_the_client_asked_for() -> None:
    m = StreamMeter(wants_usage=True, wants_continuous_usage=False)
    assert b"usage" not in m.feed(chunk("a", (3, 1)))
    final = chunk("", (3, 1), final=True)
    assert m.feed(final) == final
    both = StreamMeter(wants_usage=True, wants_continuous_usage=True)
    line = chunk("a", (3, 1))
    assert both.feed(line) == line


def test_meter_passes_other_lines_and_usage_free_chunks() -> None:
    m = StreamMeter(wants_usage=False, wants_continuous_usage=False)
    assert m.feed(b"\n") == b"\n"
    assert m.feed(b": keep-alive\n") == b": keep-alive\n"
    plain = chunk("x", None)
    assert m.feed(plain) == plain
    null_usage = b'data: {"id":"c","choices":[{"delta":{}}],"usage":null}\n'
    assert m.feed(null_usage) == null_usage
    assert m.feed(b"data: {broken\n") == b"data: {broken\n"


def test_parse_request_and_reservation() -> None:
    req = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                        b'"max_tokens": 10, "n": 2, "stream": true, "extra": {"kept": 1}}',
                        "chat", default_reserved=1000)
    assert req.model == "m" and req.stream and not req.wants_usage
    assert req.reserved_tokens == estimate_prompt_tokens(req.body) + 20
    sent = msgspec.json.decode(upstream_body(req))
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent["extra"] == {"kept": 1}  # unknown fields pass through
    whole = parse_request(b'{"model": "m", "prompt": "x"}', "completions", default_reserved=50)
    assert upstream_body(whole) == whole.raw  # untouched
    assert whole.reserved_tokens == estimate_prompt_tokens(whole.body) + 50
    emb = parse_request(b'{"model": "m", "input": "x"}', "embeddings", default_reserved=50)
    assert emb.reserved_tokens == estimate_prompt_tokens(emb.body)


@pytest.mark.parametrize(("raw", "param"), [
    (b"", None), (b"{", None), (b"[]", None), (b'{"model": 3}', "model"),
    (b'{"model": "m", "stream": 1}', "stream"), (b'{"model": "m", "n": -1}', "n"),
    (b'{"model": "m", "max_tokens": 1.5}', "max_tokens"),
    (b'{"model": "m", "stream_options": []}', "stream_options"),
])
def test_bad_requests_name_the_field(raw: bytes, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(raw, "chat", default_reserved=10)
    assert info.value.param == param


def test_embeddings_cannot_stream() -> None:
    with pytest.raises(BadRequest, match="cannot be streamed"):
        parse_request(b'{"model": "m", "input": "x", "stream": true}', "embeddings",
                      default_reserved=10)


def test_usage_of_whole_answers() -> None:
    assert usage_of(b'{"usage": {"prompt_tokens": 4, "completion_tokens": 6}}') == (4, 6)
    assert usage_of(b'{"choices": []}') == (0, 0)
    assert usage_of(b"not json") == (0, 0)


def test_node_errors_reach_clients_in_openai_shape() -> None:
    from services.gateway.protocol import openai_error_body

    current = b'{"error": {"message": "too long", "type": "BadRequestError", "param": null, ' \
              b'"code": 400}}'
    assert openai_error_body(400, current) is current  # vLLM 0.10.1 on: untouched
    flat = (b'{"object": "error", "message": "This model\'s maximum context length is 8192",'
            b' "type": "BadRequestError", "param": null, "code": 400}')
    assert msgspec.json.decode(openai_error_body(400, flat)) == {"error": {
        "message": "This model's maximum context length is 8192", "type": "BadRequestError",
        "param": None, "code": None}}
    odd = msgspec.json.decode(openai_error_body(404, b"<html>Not Found</html>"))
    assert odd["error"]["type"] == "invalid_request_error"
    assert odd["error"]["message"] == ("The model server refused the request (404): "
                                       "<html>Not Found</html>")
    assert msgspec.json.decode(openai_error_body(422, b""))["error"]["message"].endswith("(422).")
