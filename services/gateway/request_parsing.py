"""Parsing and bounding an OpenAI-compatible request body (`parse_request`): the bounds it
checks and the token reservation it counts. Pure.

Bounds, checked before anything leaves: the body nests at most MAX_JSON_DEPTH levels; `n`
from 1 to `max_n`; prompts * `n` (the sequences one completions request makes a node run) at
most `max_batch_sequences`; an embeddings request's `input` at most `max_inputs` items;
`max_tokens` and `max_completion_tokens` at most the model's context length. The token
reservation counts every output the request may produce: prompts * `n` * (`max_tokens`, else
the default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from services.gateway.protocol import (
    ENDPOINTS,
    GENERATING,
    SALTED,
    STREAMABLE,
    BadRequest,
    InferenceRequest,
    _decode,
    _encode,
)

MAX_RESPONSE_ID = 128
MAX_LOGPROBS = 20
"""vLLM's default --max-logprobs, and OpenAI's own bound on top_logprobs."""
INT64 = (-(2**63), 2**63 - 1)
MAX_LIST_ITEMS = {"stop": 16, "logit_bias": 1024, "tools": 128, "allowed_token_ids": 1024,
                  "bad_words": 1024, "stop_token_ids": 1024, "include": 16}
"""Lists a node walks for every token it makes (stop strings, biases, banned words) or
renders into every prompt (tools): bounded, so one request cannot slow a shared node for
everyone. Generous beside OpenAI's own (4 stop sequences, 128 tools)."""
DEFAULT_MAX_N = 8
DEFAULT_MAX_BATCH_SEQUENCES = 64
DEFAULT_MAX_INPUTS = 2048
"""OpenAI's own limit on an embeddings request's inputs."""
MAX_JSON_DEPTH = 64
"""How deep a request body may nest. msgspec decodes (and encodes) recursively, so how deep it
can go depends on how deep the stack already is: a body just under that, decoded here, would
raise RecursionError when encoded again further down the stack (upstream_body, in the proxy).
A fixed bound far below the interpreter's keeps every later step safe; OpenAI-shaped bodies,
JSON schemas of tools and response formats included, nest a few levels."""


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"'{name}' must be a non-negative integer", name)
    return value


def _choices(body: dict[str, Any], max_n: int) -> int:
    """`n`, from 1 to `max_n` (absent or null: 1)."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int):
        raise BadRequest("Invalid 'n': expected an integer.", "n", "invalid_type")
    if n < 1:
        raise BadRequest(f"Invalid 'n': integer below minimum value. Expected a value >= 1, "
                         f"but got {n} instead.", "n", "integer_below_min_value")
    if n > max_n:
        # The number quoted is cut short: it is the client's, and may be any size.
        raise BadRequest(f"Invalid 'n': integer above maximum value. Expected a value <= "
                         f"{max_n}, but got {_quote_int(n)} instead.", "n",
                         "integer_above_max_value")
    return n


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """`name` as an integer from `low` to `high` (absent or null: None), in OpenAI's words
    when it is not one."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"Invalid '{name}': expected an integer.", name, "invalid_type")
    if value < low:
        raise BadRequest(f"Invalid '{name}': integer below minimum value. Expected a value >= "
                         f"{low}, but got {_quote_int(value)} instead.", name,
                         "integer_below_min_value")
    if value > high:
        raise BadRequest(f"Invalid '{name}': integer above maximum value. Expected a value <= "
                         f"{high}, but got {_quote_int(value)} instead.", name,
                         "integer_above_max_value")
    return value


def _bound_fields(body: dict[str, Any], endpoint: str, context_length: int | None) -> None:
    """The integer knobs vLLM takes beside `n` and the output budget, and the lists it walks
    per token: bounded before a node sees them (vLLM bounds some itself, after the request
    has taken a slot; a seed past 64 bits it does not)."""
    context = context_length if context_length is not None else INT64[1]
    _integer(body, "seed", *INT64)
    if endpoint == "responses":
        _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        _integer(body, "max_tool_calls", 0, MAX_LIST_ITEMS["tools"])
    if endpoint in GENERATING:
        if endpoint == "chat":
            _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        else:
            _integer(body, "logprobs", 0, MAX_LOGPROBS)
        _integer(body, "prompt_logprobs", 0, MAX_LOGPROBS)
        _integer(body, "top_k", -1, 2**31 - 1)
        _integer(body, "min_tokens", 0, context)
    if endpoint in GENERATING or endpoint in ("embeddings", "rerank", "score"):
        _integer(body, "truncate_prompt_tokens", -1, context)
    for name, limit in MAX_LIST_ITEMS.items():
        value = body.get(name)
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise BadRequest(f"Invalid '{name}': array too long. Expected an array with "
                             f"maximum length {limit}, but got an array with length "
                             f"{len(value)} instead.", name, "array_above_max_length")


def _quote_int(value: int) -> str:
    text = str(value) if value.bit_length() < 200 else "a larger number"
    return text if len(text) <= 24 else text[:21] + "..."


def _output_budget(body: dict[str, Any], context_length: int | None,
                   names: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
                   ) -> int | None:
    """The output tokens asked for (the last of `names` given: max_completion_tokens, else
    max_tokens), each bounded by the model's context length when it is known."""
    budget = None
    for name in names:
        value = _positive_int(body, name)
        if value is None:
            continue
        if context_length is not None and value > context_length:
            raise BadRequest(f"'{name}' is too large: {_quote_int(value)}. This model's context "
                             f"is {context_length} tokens (prompt and output together).",
                             name, "integer_above_max_value")
        budget = value  # max_completion_tokens, checked last, wins (as in vLLM)
    return budget


def _reserved_output(body: dict[str, Any], context_length: int | None, default: int,
                     names: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
                     ) -> tuple[int, int]:
    """The output budget per sequence: to reserve against token limits (what the request
    asks for, else `default`, at most the context), and at most (what it asks for, else the
    context: vLLM then generates up to the rest of it)."""
    budget = _output_budget(body, context_length, names)
    if budget is not None:
        return budget, budget
    reserved = default if context_length is None else min(default, context_length)
    return reserved, reserved if context_length is None else context_length


def _batch_size(value: Any) -> int:
    """How many prompts (completions' `prompt`) or inputs (embeddings' `input`) `value` holds:
    one per string or list of token ids in a list; a string or a flat list of token ids is
    one."""
    if isinstance(value, list) and value and not all(
            isinstance(p, int) and not isinstance(p, bool) for p in value):
        return len(value)
    return 1


def _bound_sequences(prompts: int, n: int, limit: int) -> None:
    """Each prompt of a completions batch runs `n` sequences on one node: a request of a
    million prompts is as bad for a shared node as a huge `n` (a single prompt's `n` is
    already bounded by `_choices`)."""
    if prompts * n > limit:
        raise BadRequest(f"Invalid 'prompt': too many sequences. Expected at most {limit} "
                         f"(prompts x n, or x best_of when larger) per request, but got "
                         f"{prompts} prompts x {n} instead.", "prompt", "array_above_max_length")


def _bound_inputs(inputs: int, limit: int, param: str = "input") -> None:
    if inputs > limit:
        raise BadRequest(f"Invalid '{param}': array too long. Expected an array with maximum "
                         f"length {limit}, but got an array with length {inputs} instead.",
                         param, "array_above_max_length")


_CONTAINERS = frozenset({list, dict})


def nests_deeper_than(body: Any, raw: bytes, limit: int) -> bool:
    """Whether the decoded `body` (of `raw`) nests more than `limit` levels (a scalar is 0,
    `{}` is 1). Without recursion, so the check itself cannot exhaust the stack."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case: fewer brackets than levels allowed, at C speed
    level: list[Any] = [body] if type(body) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        inner: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            # Scanned at C speed; only containers holding containers are walked item by item
            # (a long list of strings or token ids is not).
            if not _CONTAINERS.isdisjoint(map(type, items)):
                inner.extend(item for item in items if type(item) in _CONTAINERS)
        level = inner
    return False


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap over-estimate (~4 bytes a token) of the prompt, for the token reservation."""
    size = 0
    for name in ("messages", "prompt", "input", "instructions", "query", "documents",
                 "text_1", "text_2"):
        value = body.get(name)
        if isinstance(value, str):
            size += len(value)
        elif value is not None:
            size += len(_encode(value))
    return size // 4 + 8


def parse_request(raw: bytes, endpoint: str, *, default_reserved: int,
                  max_n: int = DEFAULT_MAX_N,
                  max_batch_sequences: int = DEFAULT_MAX_BATCH_SEQUENCES,
                  max_inputs: int = DEFAULT_MAX_INPUTS,
                  context_length: Callable[[str], int | None] | None = None,
                  cache_salt: str | None = None) -> InferenceRequest:
    """The request in `raw` for `endpoint`, bounded; BadRequest names what is wrong.
    `context_length(model)` is the model's context (None: unknown model, not bounded here);
    `cache_salt` replaces whatever salt the client sent."""
    if not raw.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    too_deep = f"The request body nests more than {MAX_JSON_DEPTH} levels deep."
    try:
        body = _decode(raw)
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    except RecursionError:
        raise BadRequest(too_deep) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if nests_deeper_than(body, raw, MAX_JSON_DEPTH):
        raise BadRequest(too_deep)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    if stream and endpoint not in STREAMABLE:
        raise BadRequest(f"{ENDPOINTS[endpoint]} answers cannot be streamed.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    options = options or {}
    completion = bound = 0
    sequences = 1
    limit = context_length(model) if context_length is not None else None
    if endpoint in GENERATING:
        # No request runs more than max_batch_sequences sequences, a single prompt's n too.
        n = _choices(body, min(max_n, max_batch_sequences))
        # best_of sequences run for the n returned: as bounded as n, at least n, and what
        # the node runs (and the reservation counts).
        runs = _integer(body, "best_of", n, min(max_n, max_batch_sequences)) or n
        prompts = _batch_size(body.get("prompt")) if endpoint == "completions" else 1
        _bound_sequences(prompts, runs, max_batch_sequences)
        reserved, most = _reserved_output(body, limit, default_reserved)
        sequences = prompts * runs
        completion, bound = sequences * reserved, sequences * most
    elif endpoint == "responses":
        completion, bound = _reserved_output(body, limit, default_reserved,
                                             ("max_output_tokens",))
    elif endpoint == "embeddings":
        _bound_inputs(_batch_size(body.get("input")), max_inputs)
    elif endpoint == "rerank":
        _bound_inputs(_batch_size(body.get("documents")), max_inputs, "documents")
    elif endpoint == "score":
        for name in ("text_1", "text_2"):
            _bound_inputs(_batch_size(body.get(name)), max_inputs, name)
    _bound_fields(body, endpoint, limit)
    previous, store = None, False
    if endpoint == "responses":
        previous = response_id_param(body.get("previous_response_id"), "previous_response_id")
        store = body.get("store", True) is not False
    return InferenceRequest(
        endpoint=endpoint, model=model, stream=stream, body=body, raw=raw,
        wants_usage=bool(options.get("include_usage")),
        wants_continuous_usage=bool(options.get("continuous_usage_stats")),
        reserved_tokens=estimate_prompt_tokens(body) + completion, output_bound=bound,
        sequences=sequences,
        cache_salt=cache_salt if endpoint in SALTED else None,
        previous_response_id=previous, store=store)


def response_id_param(value: Any, param: str) -> str | None:
    """A response id the client gave (None: none given); BadRequest when it cannot be one.
    vLLM's ids are "resp_" and hex; anything within these bounds is looked up, and unknown."""
    if value is None:
        return None
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_RESPONSE_ID
            or not all(c.isascii() and (c.isalnum() or c in "_-") for c in value)):
        raise BadRequest(f"Invalid '{param}': expected a response id (letters, digits, '_' "
                         f"and '-', at most {MAX_RESPONSE_ID}).", param, "invalid_value")
    return value
