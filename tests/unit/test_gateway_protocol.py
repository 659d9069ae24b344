"""How the gateway reads and rewrites OpenAI request bodies and vLLM's SSE streams (pure)."""

from __future__ import annotations

import json

import msgspec
import pytest

from services.gateway.node_answers import StreamMeter, answer_of
from services.gateway.protocol import BadRequest, upstream_body
from services.gateway.request_parsing import (
    DEFAULT_MAX_BATCH_SEQUENCES,
    DEFAULT_MAX_INPUTS,
    MAX_JSON_DEPTH,
    estimate_prompt_tokens,
    nests_deeper_than,
    parse_request,
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
    assert answer_of(b'{"usage": {"prompt_tokens": 4, "completion_tokens": 6}}')[0] == (4, 6)
    assert answer_of(b'{"choices": []}')[0] == (0, 0)
    assert answer_of(b"not json")[0] == (0, 0)


def test_node_errors_reach_clients_in_openai_shape() -> None:
    from services.gateway.node_answers import openai_error_body

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


# --------------------------------------------------------------------------- bounds

CONTEXT = {"m": 8192}.get
CHAT = b'"messages": [{"role": "user", "content": "hi"}]'


def chat_body(extra: bytes = b"") -> bytes:
    return b'{"model": "m", ' + CHAT + (b", " + extra if extra else b"") + b"}"


@pytest.mark.parametrize(("extra", "code"), [
    (b'"n": 9', "integer_above_max_value"),
    (b'"n": 9223372036854775808', "integer_above_max_value"),  # 2^63
    (b'"n": 99999999999999999999999999999999999999', "integer_above_max_value"),
    (b'"n": 0', "integer_below_min_value"),
    (b'"n": -1', "integer_below_min_value"),
    (b'"n": 2.0', "invalid_type"),
    (b'"n": "2"', "invalid_type"),
    (b'"n": true', "invalid_type"),
])
def test_n_is_bounded(extra: bytes, code: str) -> None:
    for endpoint, body in (("chat", chat_body(extra)),
                           ("completions", b'{"model": "m", "prompt": "x", ' + extra + b"}")):
        with pytest.raises(BadRequest) as info:
            parse_request(body, endpoint, default_reserved=10, max_n=8, context_length=CONTEXT)
        assert (info.value.param, info.value.code) == ("n", code)
        assert len(info.value.message) < 200  # a huge number is not echoed whole


def test_n_up_to_the_setting_passes() -> None:
    req = parse_request(chat_body(b'"n": 8'), "chat", default_reserved=10, max_n=8)
    assert req.body["n"] == 8
    assert parse_request(chat_body(b'"n": null'), "chat", default_reserved=10).body["n"] is None
    with pytest.raises(BadRequest):
        parse_request(chat_body(b'"n": 3'), "chat", default_reserved=10, max_n=2)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_output_tokens_are_bounded_by_the_context(param: str) -> None:
    ok = parse_request(chat_body(f'"{param}": 8192'.encode()), "chat", default_reserved=10,
                       context_length=CONTEXT)
    assert ok.body[param] == 8192
    for too_many in (8193, 2**63, 10**40):
        with pytest.raises(BadRequest) as info:
            parse_request(chat_body(f'"{param}": {too_many}'.encode()), "chat",
                          default_reserved=10, context_length=CONTEXT)
        assert (info.value.param, info.value.code) == (param, "integer_above_max_value")
        assert "8192" in info.value.message
    # An unknown model (the route answers 404 for it) and embeddings are not bounded here.
    parse_request(b'{"model": "other", "max_tokens": 9000}', "completions",
                  default_reserved=10, context_length=CONTEXT)


def test_the_reservation_counts_every_output() -> None:
    def reserved(body: bytes, endpoint: str = "chat", default: int = 100) -> int:
        req = parse_request(body, endpoint, default_reserved=default, context_length=CONTEXT)
        return req.reserved_tokens - estimate_prompt_tokens(req.body)

    assert reserved(chat_body(b'"max_tokens": 10, "n": 3')) == 30
    assert reserved(chat_body(b'"n": 4')) == 400  # no max_tokens: n x the default budget
    assert reserved(chat_body()) == 100
    assert reserved(chat_body(b'"max_tokens": 10, "max_completion_tokens": 20, "n": 2')) == 40
    # The default never exceeds the model's context.
    assert reserved(chat_body(b'"n": 2'), default=10_000) == 2 * 8192
    # Completions: each prompt of a batch gets its n outputs; token ids are one prompt.
    assert reserved(b'{"model": "m", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 5}',
                    "completions") == 30
    assert reserved(b'{"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 5}',
                    "completions") == 10
    assert reserved(b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}',
                    "completions") == 5
    assert reserved(b'{"model": "m", "input": "x", "n": 50}', "embeddings") == 0


# --------------------------------------------------------------------------- cache_salt

TENANT = "0190f3a1-7c2e-7d4b-9a1f-1a2b3c4d5e6f"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sent", [None, '"other-tenant"', "5", '""', "null"])
def test_the_node_gets_the_tenant_as_cache_salt(stream: bool, sent: str | None) -> None:
    extra = b'"stream": true' if stream else b'"temperature": 0'
    if sent is not None:
        extra += f', "cache_salt": {sent}'.encode()
    for endpoint, body in (("chat", chat_body(extra)),
                           ("completions", b'{"model": "m", "prompt": "x", ' + extra + b"}")):
        req = parse_request(body, endpoint, default_reserved=10, cache_salt=TENANT)
        sent_body = msgspec.json.decode(upstream_body(req))
        assert sent_body["cache_salt"] == TENANT
        assert sent_body["model"] == "m" and sent_body.get("temperature", 0) == 0


def test_embeddings_are_salted_and_an_unsalted_request_is_untouched() -> None:
    emb = parse_request(b'{"model": "m", "input": "x"}\n', "embeddings", default_reserved=10,
                        cache_salt=TENANT)
    assert msgspec.json.decode(upstream_body(emb)) == {"model": "m", "input": "x",
                                                       "cache_salt": TENANT}
    plain = parse_request(chat_body(), "chat", default_reserved=10)
    assert upstream_body(plain) is plain.raw


def test_a_salt_the_client_hid_in_an_escape_is_replaced_too() -> None:
    body = b'{"model": "m", "prompt": "x", "cache\\u005fsalt": "victim"}'
    req = parse_request(body, "completions", default_reserved=10, cache_salt=TENANT)
    sent = upstream_body(req)
    assert b"victim" not in sent and msgspec.json.decode(sent)["cache_salt"] == TENANT


# --------------------------------------------------------------------------- batches


def prompts(count: int, extra: bytes = b"") -> bytes:
    batch = b"[" + b", ".join([b'"x"'] * count) + b"]"
    return b'{"model": "m", "prompt": ' + batch + (b", " + extra if extra else b"") + b"}"


def inputs(value: bytes) -> bytes:
    return b'{"model": "m", "input": ' + value + b"}"


def test_a_completions_batch_is_bounded_in_sequences() -> None:
    def parse(body: bytes) -> object:
        return parse_request(body, "completions", default_reserved=10, max_n=8,
                             max_batch_sequences=64)

    parse(prompts(64))
    parse(prompts(8, b'"n": 8'))  # 8 prompts x 8 outputs: 64 sequences
    for body in (prompts(65), prompts(9, b'"n": 8'), prompts(1_000_000, b'"n": 8'),
                 b'{"model": "m", "prompt": [' + b", ".join([b"[1, 2]"] * 65) + b"]}"):
        with pytest.raises(BadRequest) as info:
            parse(body)
        assert (info.value.param, info.value.code) == ("prompt", "array_above_max_length")
        assert "64" in info.value.message and len(info.value.message) < 200
    # A flat list of token ids is one prompt, however long.
    parse(b'{"model": "m", "prompt": [' + b", ".join([b"7"] * 5000) + b"], \"n\": 8}")


def test_one_prompt_s_n_is_bounded_by_the_sequences_too() -> None:
    # An operator's MAX_N above MAX_BATCH_SEQUENCES: a single prompt's n is refused as n.
    for endpoint, body in (("chat", chat_body(b'"n": 5')),
                           ("completions", b'{"model": "m", "prompt": "x", "n": 5}')):
        with pytest.raises(BadRequest) as info:
            parse_request(body, endpoint, default_reserved=10, max_n=16, max_batch_sequences=4)
        assert (info.value.param, info.value.code) == ("n", "integer_above_max_value")
        assert "<= 4" in info.value.message


def test_batches_are_bounded_by_default() -> None:
    parse_request(prompts(DEFAULT_MAX_BATCH_SEQUENCES), "completions", default_reserved=10)
    with pytest.raises(BadRequest):
        parse_request(prompts(DEFAULT_MAX_BATCH_SEQUENCES + 1), "completions",
                      default_reserved=10)
    many = b"[" + b",".join([b'"x"'] * DEFAULT_MAX_INPUTS) + b"]"
    parse_request(inputs(many), "embeddings", default_reserved=10)
    with pytest.raises(BadRequest):
        parse_request(inputs(many[:-1] + b',"x"]'), "embeddings", default_reserved=10)
    assert DEFAULT_MAX_INPUTS == 2048  # OpenAI's own


@pytest.mark.parametrize(("value", "count"), [
    (b'"one string"', 1), (b"[1, 2, 3]", 1), (b'["a", "b", "c"]', 3),
    (b"[[1, 2], [3], [4]]", 3), (b"[]", 1),
])
def test_embeddings_inputs_are_bounded(value: bytes, count: int) -> None:
    ok = parse_request(inputs(value), "embeddings", default_reserved=10, max_inputs=count)
    assert ok.reserved_tokens == estimate_prompt_tokens(ok.body)
    if count == 1:
        return  # a single input is never refused: nothing less could be sent
    with pytest.raises(BadRequest) as info:
        parse_request(inputs(value), "embeddings", default_reserved=10, max_inputs=count - 1)
    assert (info.value.param, info.value.code) == ("input", "array_above_max_length")
    assert info.value.message == (
        f"Invalid 'input': array too long. Expected an array with maximum length {count - 1}, "
        f"but got an array with length {count} instead.")


# --------------------------------------------------------------------------- nesting


def nested(depth: int) -> bytes:
    """A chat body whose deepest value is `depth` levels down (the body itself is level 1)."""
    return chat_body(b'"extra": ' + b"[" * (depth - 1) + b"]" * (depth - 1))


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 900, 1000, 100_000])
def test_deep_nesting_is_a_bad_request(depth: int) -> None:
    """1,000 levels made msgspec raise RecursionError (a 500); 900 decode here, but would
    not encode again deeper down the stack (in the proxy): both are refused as too deep."""
    for endpoint in ("chat", "completions", "embeddings"):
        with pytest.raises(BadRequest) as info:
            parse_request(nested(depth), endpoint, default_reserved=10)
        assert info.value.param is None
        assert info.value.message == (f"The request body nests more than {MAX_JSON_DEPTH} "
                                      "levels deep.")


def test_nesting_up_to_the_bound_passes() -> None:
    req = parse_request(nested(MAX_JSON_DEPTH), "chat", default_reserved=10, cache_salt=TENANT)
    assert msgspec.json.decode(upstream_body(req))["cache_salt"] == TENANT


def test_nesting_is_measured_in_every_branch_without_recursion() -> None:
    def deep(levels: int) -> list[object]:
        value: list[object] = []
        for _ in range(levels - 1):
            value = [value]
        return value

    wide: dict[str, object] = {"a": ["x"] * 1000, "b": [{"c": 1}] * 100, "d": deep(5)}
    raw = msgspec.json.encode(wide)
    assert not nests_deeper_than(wide, raw, 6) and nests_deeper_than(wide, raw, 5)
    # The last branch of many is the deep one; a scalar nests 0 levels.
    late = {"a": [[1]] * 100, "z": {"y": deep(70)}}
    assert nests_deeper_than(late, msgspec.json.encode(late), 64)
    assert not nests_deeper_than("x", b'"[[[["', 1)
    # Fewer brackets than levels allowed: no walk at all (brackets in strings count too).
    assert not nests_deeper_than({"a": "[[[["}, b'{"a": "[[[["}', 5)
    too_deep = deep(10_000)  # a walk that recursed would hit the interpreter's limit
    assert nests_deeper_than(too_deep, b"[" * 10_000, 64)


def test_node_answers_nested_too_deep_are_not_json_to_us() -> None:
    """A rogue node's answer must not raise out of the gateway either."""
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b', "usage": {"prompt_tokens": 1}}'
    assert answer_of(deep)[0] == (0, 0)
    line = b"data: " + deep + b"\n"
    assert StreamMeter(wants_usage=False, wants_continuous_usage=False).feed(line) == line
    from services.gateway.node_answers import openai_error_body

    error = msgspec.json.decode(openai_error_body(500, deep))["error"]
    assert error["message"].startswith("The model server refused the request (500)")


# --------------------------------------------------------------------------- knobs and lists


@pytest.mark.parametrize(("endpoint", "field", "value", "code"), [
    ("chat", "seed", 2**63, "integer_above_max_value"),
    ("chat", "seed", -(2**63) - 1, "integer_below_min_value"),
    ("completions", "seed", 10**400, "integer_above_max_value"),
    ("chat", "top_logprobs", 21, "integer_above_max_value"),
    ("chat", "top_logprobs", -1, "integer_below_min_value"),
    ("completions", "logprobs", 21, "integer_above_max_value"),
    ("responses", "top_logprobs", 21, "integer_above_max_value"),
    ("chat", "prompt_logprobs", 2**64, "integer_above_max_value"),
    ("chat", "best_of", 9, "integer_above_max_value"),
    ("completions", "best_of", 2**63, "integer_above_max_value"),
    ("chat", "top_k", 2**31, "integer_above_max_value"),
    ("chat", "min_tokens", 8193, "integer_above_max_value"),
    ("embeddings", "truncate_prompt_tokens", 8193, "integer_above_max_value"),
    ("chat", "seed", "1", "invalid_type"),
    ("chat", "top_logprobs", 1.0, "invalid_type"),
    ("chat", "best_of", True, "invalid_type"),
])
def test_integer_knobs_are_bounded_before_a_node_sees_them(endpoint: str, field: str,
                                                          value: object, code: str) -> None:
    body: dict[str, object] = {"model": "m", "prompt": "p", "messages": [], "input": "i",
                               field: value}
    with pytest.raises(BadRequest) as err:
        parse_request(msgspec.json.encode(body), endpoint, default_reserved=16,
                      context_length=lambda m: 8192)
    assert (err.value.param, err.value.code) == (field, code)
    assert len(err.value.message) < 300  # a huge number is not echoed whole


def test_best_of_is_at_least_n_and_reserved_as_what_runs() -> None:
    def parse(**fields: object) -> object:
        return parse_request(msgspec.json.encode({"model": "m", "prompt": "p", **fields}),
                             "completions", default_reserved=16)
    with pytest.raises(BadRequest) as err:
        parse(n=3, best_of=2)
    assert err.value.code == "integer_below_min_value"
    assert parse(n=2, best_of=4, max_tokens=10).reserved_tokens == \
        parse(n=4, max_tokens=10).reserved_tokens  # type: ignore[attr-defined]


@pytest.mark.parametrize(("field", "value"), [
    ("stop", ["s"] * 17), ("logit_bias", {str(i): 1 for i in range(1025)}),
    ("tools", [{"type": "function"}] * 129), ("bad_words", ["w"] * 1025),
])
def test_lists_a_node_walks_per_token_are_bounded(field: str, value: object) -> None:
    with pytest.raises(BadRequest) as err:
        parse_request(msgspec.json.encode({"model": "m", "messages": [], field: value}),
                      "chat", default_reserved=16)
    assert (err.value.param, err.value.code) == (field, "array_above_max_length")


def test_knobs_within_bounds_pass_untouched() -> None:
    body = {"model": "m", "messages": [], "seed": 2**63 - 1, "top_logprobs": 20,
            "logprobs": True, "best_of": 8, "n": 8, "top_k": -1, "min_tokens": 5,
            "stop": ["a"] * 16}
    raw = msgspec.json.encode(body)
    req = parse_request(raw, "chat", default_reserved=16)
    assert req.body == body


def test_a_budget_lowers_the_output_limit_where_each_endpoint_takes_it() -> None:
    """The node must stop at what a budget pays for: every field vLLM reads the limit from
    comes down, and a min_tokens above it too (vLLM refuses min_tokens > max_tokens)."""
    from services.gateway.protocol import limit_output

    chat = parse_request(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2,
        "max_completion_tokens": 500, "min_tokens": 40}).encode(), "chat",
        default_reserved=256, context_length=lambda _: 4096)
    assert (chat.sequences, chat.output_bound) == (2, 1000)
    limited = limit_output(chat, 30)
    body = json.loads(upstream_body(limited))
    assert (body["max_tokens"], body["max_completion_tokens"], body["min_tokens"]) == (30, 30, 30)
    assert limited.output_bound == 60 and body["messages"] == chat.body["messages"]
    batch = parse_request(json.dumps({"model": "m", "prompt": ["a", "b", "c"], "best_of": 2,
                                      "n": 1}).encode(), "completions",
                          default_reserved=256, context_length=lambda _: 4096)
    assert (batch.sequences, batch.output_bound) == (6, 6 * 4096)  # no limit: the context
    body = json.loads(upstream_body(limit_output(batch, 7)))
    assert body["max_tokens"] == 7 and "max_completion_tokens" not in body
    responses = parse_request(b'{"model": "m", "input": "hi"}', "responses",
                              default_reserved=256, context_length=lambda _: 4096)
    assert json.loads(upstream_body(limit_output(responses, 9)))["max_output_tokens"] == 9
    with pytest.raises(ValueError, match="at least one token"):
        limit_output(responses, 0)
