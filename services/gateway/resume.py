"""Resuming a request whose node failed after it started (issue 16). Pure.

A stream keeps what it has sent the client (`Transcript`: the data lines as sent, read only
if the stream is cut). To go on elsewhere, the gateway asks another node to continue it,
with nothing but vLLM's API (`continuation_body`):

- chat: the original messages plus what was sent as a final assistant message, with
  ``continue_final_message: true`` and ``add_generation_prompt: false``;
- completions: the prompt followed by the text already sent (``echo`` off);
- the output limits (`max_tokens`, `max_completion_tokens`, `min_tokens`) less the tokens
  already sent.

The new node's chunks are rewritten (`Rewriter`) so the client's stream keeps its id,
`created`, model and shape: the continuation's opening role chunk is dropped, and its usage
counts the original prompt and every completion token the client got (the continuation's
own prompt, the resume's prefill, is the platform's and never on the bill).

Not resumable (the stream ends with an error event, as before): `n` above 1, stop strings,
a stream that sent tool calls or reasoning (vLLM cannot continue those), a completion with
`echo` or a prompt that is not one string, and anything past `MAX_TRANSCRIPT` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from services.gateway.protocol import InferenceRequest

__all__ = ["MAX_TRANSCRIPT", "RESUMABLE_STREAMS", "Rewriter", "Sent", "Transcript",
           "continuation_body"]

RESUMABLE_STREAMS: Final = frozenset({"chat", "completions"})
RESUMABLE_WHOLE: Final = frozenset({"chat", "completions", "embeddings"})
"""Whole answers sent again from the start: nothing of them reached the client."""
MAX_TRANSCRIPT: Final = 4 << 20
"""A stream that sent more than this (about a million tokens' chunks) is not resumed."""
LIMITS: Final = ("max_tokens", "max_completion_tokens")

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode
_NOT_JSON = (msgspec.DecodeError, RecursionError)


@dataclass
class Transcript:
    """What a stream has sent, as written (joined and read only if the stream is cut: on the
    hot path a chunk costs one append)."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, out: bytes) -> None:
        if self.size <= MAX_TRANSCRIPT:
            self.size += len(out)
            self.chunks.append(out)

    def sent(self) -> Sent | None:
        """What the client has: None when it cannot be continued."""
        if self.size > MAX_TRANSCRIPT:
            return None
        out = Sent()
        for line in b"".join(self.chunks).split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                out.done = True
                continue
            try:
                chunk = _decode(payload)
            except _NOT_JSON:
                return None
            if not isinstance(chunk, dict) or not out.take(chunk):
                return None
        return out


@dataclass
class Sent:
    id: str | None = None
    created: int | None = None
    model: str | None = None
    text: str = ""
    finish_reason: str | None = None
    role_sent: bool = False
    done: bool = False

    def take(self, chunk: dict[str, Any]) -> bool:
        """One chunk the client got; False when it holds what cannot be continued."""
        self.id = self.id or chunk.get("id")
        self.created = self.created or chunk.get("created")
        self.model = self.model or chunk.get("model")
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                return False
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if delta.get("tool_calls") or delta.get("reasoning_content") \
                        or delta.get("reasoning"):
                    return False
                self.role_sent = self.role_sent or bool(delta.get("role"))
                self.text += delta.get("content") or ""
            else:
                self.text += choice.get("text") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return True


def continuation_body(req: InferenceRequest, sent: Sent, sent_tokens: int
                      ) -> dict[str, Any] | None:
    """What to ask another node for the rest of `req`'s stream (the client has `sent`, of
    `sent_tokens` completion tokens); None when it cannot be continued."""
    body = dict(req.body)
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1) \
            or body.get("stop"):
        # (A stop string holds text back: the tokens counted so far are more than the text
        # sent, and a continuation would generate and bill them again.)
        return None
    if req.endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or body.get("continue_final_message"):
            return None
        if sent.text or sent_tokens:
            body["messages"] = [*messages, {"role": "assistant", "content": sent.text}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
    elif req.endpoint == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or body.get("echo"):
            return None
        body["prompt"] = prompt + sent.text
    else:
        return None
    for name in (*LIMITS, "min_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            body[name] = max(0, value - sent_tokens)
    if any(body.get(name) == 0 for name in LIMITS):
        return None  # (not reached: a stream at its limit has finished)
    return body


class Rewriter:
    """A continuation's chunks as the client's stream goes on: its id, `created` and model;
    usage as the original prompt plus every completion token sent."""

    def __init__(self, sent: Sent, prompt_tokens: int, completion_tokens: int) -> None:
        self.sent = sent
        self.prompt_tokens = prompt_tokens
        self.completion_before = completion_tokens
        self.resume_prompt_tokens = 0
        """The continuation's own prompt: the prefill the resume cost the platform."""

    def feed(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return line
        try:
            chunk = _decode(payload)
        except _NOT_JSON:
            return line
        if not isinstance(chunk, dict):
            return line
        for name in ("id", "created", "model"):
            value = getattr(self.sent, name)
            if value is not None and name in chunk:
                chunk[name] = value
        choices = chunk.get("choices")
        if self.sent.role_sent and isinstance(choices, list) and choices:
            delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
            if isinstance(delta, dict) and delta.get("role"):
                del delta["role"]
                if not delta.get("content") and not choices[0].get("finish_reason"):
                    return b""  # the continuation's opening role chunk: already sent
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.resume_prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion = self.completion_before + int(usage.get("completion_tokens") or 0)
            usage["prompt_tokens"] = self.prompt_tokens
            usage["completion_tokens"] = completion
            usage["total_tokens"] = self.prompt_tokens + completion
            usage.pop("prompt_tokens_details", None)
        return b"data: " + _encode(chunk) + b"\n"
