"""A node's answers as the gateway reads them: the usage and id of a whole answer
(`answer_of`), an SSE stream metered chunk by chunk (`StreamMeter`), and errors in OpenAI's
shape (`openai_error_body`). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from services.gateway.protocol import _decode, _encode

_NOT_JSON = (msgspec.DecodeError, RecursionError)
"""What decoding a node's answer may raise: RecursionError for JSON nested deeper than the
stack allows (a rogue node's answer is no more trusted than a client's body)."""


class _UsageOnly(msgspec.Struct):
    """Usage as each vLLM answer says it: chat, completions, embeddings and score in prompt
    and completion tokens; responses in input and output tokens; rerank in total tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    @property
    def counts(self) -> tuple[int, int]:
        completion = self.completion_tokens or self.output_tokens
        prompt = (self.prompt_tokens or self.input_tokens
                  or max(0, self.total_tokens - completion))
        return max(0, prompt), max(0, completion)


class _WithUsage(msgspec.Struct):
    usage: _UsageOnly | None = None
    id: str | None = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly | None)


def answer_of(body: bytes) -> tuple[tuple[int, int], str | None]:
    """The (prompt, completion) tokens of a whole answer, and its id ((0, 0) and None when
    the answer does not say)."""
    try:
        answer = msgspec.json.decode(body, type=_WithUsage)
    except _NOT_JSON:  # ValidationError (a wrong shape) is a DecodeError
        return (0, 0), None
    return (answer.usage.counts if answer.usage else (0, 0)), answer.id


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
        except _NOT_JSON:
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
        except _NOT_JSON:
            return None
        if usage is None:
            self.chunks += 1
            return line
        counts = usage.counts
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
    except _NOT_JSON:
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
