"""The OpenAI-compatible request as the gateway needs it, and the body it sends a node. Pure.

Parsing and bounding a client's body into an `InferenceRequest`: `request_parsing`; reading a
node's answers (usage, streams, errors): `node_answers`.

The gateway parses a request body only to route, bound, limit and meter it; everything it
does not know passes through to vLLM unchanged, with three exceptions:
- vLLM's `cache_salt` is always the tenant's id (whatever the client sent), so the prefix
  cache of a node is never shared between tenants;
- for streams it always asks vLLM for usage on every chunk (`stream_options.include_usage` +
  vLLM's `continuous_usage_stats`), so that a client who hangs up mid-stream is billed exactly
  what it was sent, then gives each client only what it asked for;
- a request admitted with less than its worst case under a spend budget has its output limit
  lowered to what the budget pays for (`limit_output`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

import msgspec

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
             "embeddings": "/v1/embeddings", "responses": "/v1/responses",
             "rerank": "/v1/rerank", "score": "/v1/score", "tokenize": "/tokenize",
             "detokenize": "/detokenize"}
"""Each endpoint the gateway forwards, and its path on a vLLM node (vLLM serves tokenize and
detokenize outside /v1; the gateway keeps its paths)."""

SALTED = frozenset({"chat", "completions", "embeddings", "responses"})
"""Endpoints whose vLLM requests take `cache_salt`: chat, completions and responses, and
(current vLLM) the pooling requests behind embeddings. Rerank, score and tokenization touch
no prefix cache a tenant could probe."""
GENERATING = frozenset({"chat", "completions"})
"""Endpoints that produce output tokens and take `n`."""
STREAMABLE = frozenset({"chat", "completions", "responses"})
CONTINUOUS_USAGE = frozenset({"chat", "completions"})
"""Streams vLLM can report usage on every chunk of (`stream_options`); a responses stream
reports it once, in `response.completed`."""

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class InferenceRequest:
    endpoint: str
    model: str
    stream: bool
    body: dict[str, Any]
    raw: bytes
    wants_usage: bool
    """The client asked for the final usage chunk (stream_options.include_usage)."""
    wants_continuous_usage: bool
    reserved_tokens: int
    output_bound: int = 0
    """The most output tokens the request can make: what it asks for, else (vLLM generates to
    the end of the context) the model's context, per sequence. A spend budget reserves this:
    unlike `reserved_tokens`, it is never below what the node can generate."""
    sequences: int = 1
    """How many sequences `output_bound` is shared by (prompts x `n`, or x `best_of`): each
    may generate `output_bound // sequences`."""
    cache_salt: str | None = None
    """What the node's prefix cache is salted with (the tenant's id); None: left as sent."""
    previous_response_id: str | None = None
    """Responses: the stored response this one continues (it lives on one node only)."""
    store: bool = False
    """Responses: the node keeps this response (`store`, true unless the client says not)."""


OUTPUT_LIMITS: Final = {"chat": ("max_tokens", "max_completion_tokens"),
                        "completions": ("max_tokens",), "responses": ("max_output_tokens",)}
"""Where each generating endpoint takes its output limit: the first is always set by
`limit_output`, the others where the client gave them (vLLM's chat takes
max_completion_tokens over max_tokens)."""


def limit_output(req: InferenceRequest, per_sequence: int) -> InferenceRequest:
    """`req` generating at most `per_sequence` tokens a sequence (a spend budget pays for no
    more): the node then ends it itself, as any request reaching its limit (finish_reason
    `length`, usage, and in a stream `[DONE]`). A `min_tokens` above it comes down with it
    (vLLM refuses a min_tokens above max_tokens)."""
    if per_sequence < 1:
        raise ValueError("a request generates at least one token a sequence")
    body = dict(req.body)
    first, *others = OUTPUT_LIMITS[req.endpoint]
    body[first] = per_sequence
    for name in others:
        if body.get(name) is not None:
            body[name] = per_sequence
    least = body.get("min_tokens")
    if isinstance(least, int) and least > per_sequence:
        body["min_tokens"] = per_sequence
    return dataclasses.replace(req, body=body, raw=_encode(body),
                               output_bound=per_sequence * req.sequences)


def upstream_body(req: InferenceRequest) -> bytes:
    """The body for vLLM: the client's, except that `cache_salt` is the request's (the
    tenant's) and a stream always reports usage."""
    salt = req.cache_salt
    if (not req.stream or req.endpoint not in CONTINUOUS_USAGE
            or (req.wants_usage and req.wants_continuous_usage)):
        if salt is None:
            return req.raw
        if "cache_salt" not in req.body:
            # The common case, without encoding the body again: the salt goes in before the
            # object's closing brace (the body is an object with a model, so never empty).
            return req.raw.rstrip()[:-1] + b',"cache_salt":' + _encode(salt) + b"}"
        return _encode({**req.body, "cache_salt": salt})
    options = dict(req.body.get("stream_options") or {})
    options["include_usage"] = True
    options["continuous_usage_stats"] = True
    body = {**req.body, "stream_options": options}
    if salt is not None:
        body["cache_salt"] = salt
    return _encode(body)

