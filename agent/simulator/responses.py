"""Response bodies in vLLM's shapes: JSON for whole answers, Server-Sent Events for streams.

Field order and presence follow vLLM's pydantic models as serialised (``model_dump`` for whole
answers; ``model_dump_json(exclude_unset=True)`` for stream chunks, so a chunk carries only
what was set; the closing usage chunk also drops nulls). Stream chunks are assembled from bytes
prepared once per request: a stream costs one small encode per token, not one dict each.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from agent.simulator.generation import ChoiceOutput

_json = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Generation:
    """A chat or text completion, computed up front (the output is deterministic); the engine
    decides only when its tokens are sent."""

    chat: bool
    id: str
    created: int
    model: str
    choices: list[ChoiceOutput]
    prompt_tokens: list[int]
    """Per choice: the prompt tokens of the prompt it answers."""
    total_prompt_tokens: int
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: list[str] | None = None
    """Per choice, text completions only: the prompt text put before the output."""
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps = max((c.num_tokens for c in self.choices), default=0)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> dict[str, object]:
        completion = self.completion_tokens
        return {"prompt_tokens": self.total_prompt_tokens,
                "total_tokens": self.total_prompt_tokens + completion,
                "completion_tokens": completion, "prompt_tokens_details": None}


# --------------------------------------------------------------------------- whole answers


def chat_completion(gen: Generation) -> bytes:
    return _json({
        "id": gen.id, "object": "chat.completion", "created": gen.created, "model": gen.model,
        "choices": [{
            "index": i,
            "message": {"role": "assistant", "content": c.text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning_content": None},
            "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
        } for i, c in enumerate(gen.choices)],
        "service_tier": None, "system_fingerprint": None, "usage": gen.usage(),
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    })


def text_completion(gen: Generation) -> bytes:
    echo = gen.echo
    return _json({
        "id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
        "choices": [{
            "index": i, "text": (echo[i] + c.text) if echo else c.text, "logprobs": None,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            "prompt_logprobs": None,
        } for i, c in enumerate(gen.choices)],
        "service_tier": None, "system_fingerprint": None, "usage": gen.usage(),
        "kv_transfer_params": None,
    })


def embeddings(request_id: str, created: int, model: str, vectors: Sequence[list[float]],
               prompt_tokens: int, base64_encoded: bool) -> bytes:
    data: list[dict[str, object]] = []
    for i, vector in enumerate(vectors):
        embedding: object = vector
        if base64_encoded:
            raw = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(raw).decode()
        data.append({"index": i, "object": "embedding", "embedding": embedding})
    return _json({
        "id": request_id, "object": "list", "created": created, "model": model, "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                  "completion_tokens": 0, "prompt_tokens_details": None},
    })


# --------------------------------------------------------------------------- streams


class StreamEncoder:
    """The SSE events of one streamed generation."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        obj = b"chat.completion.chunk" if gen.chat else b"text_completion"
        self._head = (b'data: {"id":' + _json(gen.id) + b',"object":"' + obj
                      + b'","created":' + str(gen.created).encode() + b',"model":'
                      + _json(gen.model) + b',"choices":[')
        field = b',"delta":{"content":' if gen.chat else b',"text":'
        # Everything before a token's text, per choice: built once, not once per token.
        self._starts = [self._head + b'{"index":' + str(i).encode() + field
                        for i in range(len(gen.choices))]
        if gen.chat:
            self._going = b'},"logprobs":null,"finish_reason":null}]'
            self._done = b'},"logprobs":null,"finish_reason":'
        else:
            self._going = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]'
            self._done = b',"logprobs":null,"finish_reason":'

    def _usage(self, choice: int, completion: int) -> bytes:
        if not self.gen.continuous_usage:
            return b"}\n\n"
        prompt = self.gen.prompt_tokens[choice]
        return (b',"usage":{"prompt_tokens":' + str(prompt).encode() + b',"total_tokens":'
                + str(prompt + completion).encode() + b',"completion_tokens":'
                + str(completion).encode() + b"}}\n\n")

    def role_chunks(self) -> bytes:
        """Chat only: what vLLM sends first for each choice, with the first token."""
        return b"".join(
            self._head + b'{"index":' + str(i).encode()
            + b',"delta":{"role":"assistant","content":""},"logprobs":null,'
              b'"finish_reason":null}]' + self._usage(i, 0)
            for i in range(len(self.gen.choices)))

    def step(self, step: int) -> bytes:
        """The chunks of every choice still generating at token `step` (0-based)."""
        parts = []
        gen = self.gen
        for i, choice in enumerate(gen.choices):
            if step >= choice.num_tokens:
                continue
            delta = choice.deltas[step]
            if step == 0 and gen.echo:
                delta = gen.echo[i] + delta
            if step < choice.num_tokens - 1:
                end = self._going
            else:
                end = (self._done + _json(choice.finish_reason) + b',"stop_reason":'
                       + _json(choice.stop_reason) + b"}]")
            parts.append(self._starts[i] + _json(delta) + end + self._usage(i, step + 1))
        return b"".join(parts)

    def closing(self) -> bytes:
        """The usage chunk when asked for, then [DONE]."""
        if not self.gen.include_usage:
            return DONE
        gen = self.gen
        completion = gen.completion_tokens
        usage = (b'{"prompt_tokens":' + str(gen.total_prompt_tokens).encode()
                 + b',"total_tokens":' + str(gen.total_prompt_tokens + completion).encode()
                 + b',"completion_tokens":' + str(completion).encode() + b"}")
        return self._head + b'],"usage":' + usage + b"}\n\n" + DONE

    def whole(self) -> bytes:
        """Every event at once, for a server with no latency to simulate."""
        parts = [self.role_chunks()] if self.gen.chat else []
        parts.extend(self.step(s) for s in range(self.gen.steps))
        parts.append(self.closing())
        return b"".join(parts)
