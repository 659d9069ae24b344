"""The OpenAI-compatible request and response shapes as the gateway needs them. Pure.

The gateway parses a request body only to route, limit and meter it; everything it does not
know passes through to vLLM unchanged. For streams it always asks vLLM for usage on every
chunk (`stream_options.include_usage` + vLLM's `continuous_usage_stats`), so that a client
who hangs up mid-stream is billed exactly what it was sent, then gives each client only what
it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
             "embeddings": "/v1/embeddings"}

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


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


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"'{name}' must be a non-negative integer", name)
    return value


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap over-estimate (~4 bytes a token) of the prompt, for the token reservation."""
    size = 0
    for name in ("messages", "prompt", "input"):
        value = body.get(name)
        if isinstance(value, str):
            size += len(value)
        elif value is not None:
            size += len(_encode(value))
    return size // 4 + 8


def parse_request(raw: bytes, endpoint: str, *, default_reserved: int) -> InferenceRequest:
    if not raw.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        body = _decode(raw)
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    if endpoint == "embeddings" and stream:
        raise BadRequest("Embeddings cannot be streamed.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    options = options or {}
    n = _positive_int(body, "n") or 1
    max_tokens = _positive_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _positive_int(body, "max_tokens")
    completion = 0 if endpoint == "embeddings" else (
        max_tokens * n if max_tokens is not None else default_reserved)
    return InferenceRequest(
        endpoint=endpoint, model=model, stream=stream, body=body, raw=raw,
        wants_usage=bool(options.get("include_usage")),
        wants_continuous_usage=bool(options.get("continuous_usage_stats")),
        reserved_tokens=estimate_prompt_tokens(body) + completion)


def upstream_body(req: InferenceRequest) -> bytes:
    """The body for vLLM: the client's, untouched, except a stream always reports usage."""
    if not req.stream or (req.wants_usage and req.wants_continuous_usage):
        return req.raw
    options = dict(req.body.get("stream_options") or {})
    options["include_usage"] = True
    options["continuous_usage_stats"] = True
    return _encode({**req.body, "stream_options": options})


class _UsageOnly(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: _UsageOnly | None = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly | None)


def usage_of(body: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens of a whole (non-streamed) answer; (0, 0) when absent."""
    try:
        usage = msgspec.json.decode(body, type=_WithUsage).usage
    except msgspec.DecodeError:
        return 0, 0
    return (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)


@dataclass
class StreamMeter:
    """Follows an SSE stream from vLLM line by line: what to forward, and the usage so far.

    `feed(line)` returns the bytes to send to the client (possibly empty). The usage counted is
    that of the last chunk forwarded, so a client that disconnects is billed exactly what it
    got."""

    wants_usage: bool
    wants_continuous_usage: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: bool = False
    chunks: int = 0
    _final_usage: tuple[int, int] | None = field(default=None, repr=False)

    def feed(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line  # blank separators, comments, other SSE fields: pass through
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            if self._final_usage is not None:
                self.prompt_tokens, self.completion_tokens = self._final_usage
            return line
        at = payload.rfind(b',"usage":')
        if at < 0 and b'"usage"' not in payload:
            self.chunks += 1
            return line
        if at > 0 and payload.endswith(b"}"):
            fast = self._feed_fast(line, payload, at)
            if fast is not None:
                return fast
        try:
            chunk = _decode(payload)
        except msgspec.DecodeError:
            return line  # not ours to judge: forward as is
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if not isinstance(usage, dict):
            self.chunks += 1
            return line
        counts = (int(usage.get("prompt_tokens") or 0),
                  int(usage.get("completion_tokens") or 0))
        if chunk.get("choices") == []:
            # The final usage chunk: bill it; show it only to who asked.
            self._final_usage = counts
            self.prompt_tokens, self.completion_tokens = counts
            return line if self.wants_usage else b""
        self.chunks += 1
        self.prompt_tokens, self.completion_tokens = counts
        if self.wants_continuous_usage:
            return line
        del chunk["usage"]
        return b"data: " + _encode(chunk) + b"\n"

    def _feed_fast(self, line: bytes, payload: bytes, at: int) -> bytes | None:
        """The common case without parsing the chunk: vLLM (pydantic) writes compact JSON with
        `usage` as the last field, so it can be read and cut off by position. None when the
        chunk does not look like that (the caller then parses it)."""
        try:
            usage = _usage_decoder.decode(payload[at + 9:-1])
        except msgspec.DecodeError:
            return None
        if usage is None:
            self.chunks += 1
            return line
        counts = (usage.prompt_tokens, usage.completion_tokens)
        if b'"choices":[]' in payload[:at]:
            self._final_usage = counts
            self.prompt_tokens, self.completion_tokens = counts
            return line if self.wants_usage else b""
        self.chunks += 1
        self.prompt_tokens, self.completion_tokens = counts
        if self.wants_continuous_usage:
            return line
        return b"data: " + payload[:at] + b"}\n"


def openai_error_body(status: int, body: bytes) -> bytes:
    """A node's error answer in OpenAI's shape. Current vLLM already answers
    ``{"error": {...}}`` (passed through untouched); vLLM before 0.10.1 answered a flat
    ``{"object": "error", "message", "type", "param", "code"}``, and something in front of a
    node (a proxy, a crashed server) may answer anything at all."""
    try:
        parsed = _decode(body)
    except msgspec.DecodeError:
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), dict):
            return body
        if parsed.get("object") == "error" and isinstance(parsed.get("message"), str):
            return _encode({"error": {
                "message": parsed["message"], "type": parsed.get("type"),
                "param": parsed.get("param"),
                "code": parsed.get("code") if parsed.get("code") != status else None}})
    text = body[:200].decode(errors="replace").strip()
    return _encode({"error": {
        "message": f"The model server refused the request ({status})"
                   + (f": {text}" if text else "."),
        "type": "invalid_request_error", "param": None, "code": None}})
