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
from typing import TYPE_CHECKING, Any

import msgspec

from agent.simulator.generation import ChoiceOutput, TokenLogprob, token_logprob

if TYPE_CHECKING:
    from agent.simulator.responses_api import ResponsesMeta

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
    logprobs: int | None = None
    """Top logprobs per token (0: the sampled token's only); None: no logprobs."""
    responses: ResponsesMeta | None = None
    """Set for the Responses API: what its bodies echo of the request."""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache."""
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
            "logprobs": chat_logprobs(c, gen.logprobs), "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        } for i, c in enumerate(gen.choices)],
        "service_tier": None, "system_fingerprint": None, "usage": gen.usage(),
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    })


def text_completion(gen: Generation) -> bytes:
    echo = gen.echo
    return _json({
        "id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
        "choices": [{
            "index": i, "text": (echo[i] + c.text) if echo else c.text,
            "logprobs": completion_logprobs(c, gen.logprobs, len(echo[i]) if echo else 0),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            "prompt_logprobs": None,
        } for i, c in enumerate(gen.choices)],
        "service_tier": None, "system_fingerprint": None, "usage": gen.usage(),
        "kv_transfer_params": None,
    })


# --------------------------------------------------------------------------- logprobs


def logprobs_of(choice: ChoiceOutput, top: int, steps: range | None = None
                ) -> list[TokenLogprob]:
    tokens = choice.tokens
    start = choice.start  # a continuation's steps go on from the tokens already given
    return [token_logprob(choice.key, start + i, tokens[i], top)
            for i in (steps if steps is not None else range(len(tokens)))]


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprob_entries(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """vLLM's ChatCompletionLogProbsContent: the sampled token, then `top_logprobs` entries
    led by the sampled token itself."""
    return [{"token": t.token, "logprob": t.logprob, "bytes": _utf8(t.token),
             "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _utf8(tok)}
                              for tok, lp in t.top]} for t in entries]


def chat_logprobs(choice: ChoiceOutput, top: int | None) -> dict[str, Any] | None:
    if top is None:
        return None
    return {"content": chat_logprob_entries(logprobs_of(choice, top))}


def completion_logprob_lists(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """vLLM's CompletionLogProbs: each token's character offset in the text (advanced by
    the token's length, as vLLM does), its logprob, its text and a dict of the top ones."""
    offsets = []
    for t in entries:
        offsets.append(offset)
        offset += len(t.token)
    return {"text_offset": offsets, "token_logprobs": [t.logprob for t in entries],
            "tokens": [t.token for t in entries],
            "top_logprobs": [dict(t.top or ((t.token, t.logprob),)) for t in entries]}


def completion_logprobs(choice: ChoiceOutput, top: int | None,
                        offset: int) -> dict[str, Any] | None:
    if top is None:
        return None
    return completion_logprob_lists(logprobs_of(choice, top), offset)


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
    """The SSE events of one streamed chat or text completion."""

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
        self._logprobs = b'},"logprobs":' if gen.chat else b',"logprobs":'
        self._going = (b',"finish_reason":null}]' if gen.chat
                       else b',"finish_reason":null,"stop_reason":null}]')
        # Text sent so far per choice: a completion token's logprobs give its offset.
        self._sent = [0] * len(gen.choices)

    def opening(self) -> bytes:
        """Sent with the headers, before the engine runs the request: nothing here."""
        return b""

    def first(self) -> bytes:
        """Sent with the first token: chat's role chunks."""
        return self.role_chunks() if self.gen.chat else b""

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
                self._sent[i] += len(gen.echo[i])
                delta = gen.echo[i] + delta
            logprobs = b"null" if gen.logprobs is None else self._step_logprobs(i, step)
            self._sent[i] += len(choice.deltas[step])
            if step < choice.num_tokens - 1:
                end = self._going
            else:
                end = (b',"finish_reason":' + _json(choice.finish_reason) + b',"stop_reason":'
                       + _json(choice.stop_reason) + b"}]")
            parts.append(self._starts[i] + _json(delta) + self._logprobs + logprobs + end
                         + self._usage(i, step + 1))
        return b"".join(parts)

    def _step_logprobs(self, i: int, step: int) -> bytes:
        gen = self.gen
        assert gen.logprobs is not None
        entries = logprobs_of(gen.choices[i], gen.logprobs, range(step, step + 1))
        if gen.chat:
            return _json({"content": chat_logprob_entries(entries)})
        # The offset of a streamed completion token: the text sent before it.
        return _json(completion_logprob_lists(entries, self._sent[i]))

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
        parts = [self.opening(), self.first()]
        parts.extend(self.step(s) for s in range(self.gen.steps))
        parts.append(self.closing())
        return b"".join(parts)


# --------------------------------------------------------------------------- score, rerank


def scores(request_id: str, created: int, model: str, values: Sequence[float],
           prompt_tokens: int) -> bytes:
    return _json({
        "id": request_id, "object": "list", "created": created, "model": model,
        "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                  "completion_tokens": 0, "prompt_tokens_details": None},
    })


def rerank(request_id: str, model: str, documents: Sequence[str], values: Sequence[float],
           top_n: int, prompt_tokens: int) -> bytes:
    """Most relevant first; `top_n` of them when it is below the number of documents."""
    ranked = sorted(enumerate(values), key=lambda iv: -iv[1])  # stable: ties keep order
    if 0 < top_n < len(documents):
        ranked = ranked[:top_n]
    return _json({"id": request_id, "model": model, "usage": {"total_tokens": prompt_tokens},
                  "results": [{"index": i, "document": {"text": documents[i],
                                                        "multi_modal": None},
                               "relevance_score": v} for i, v in ranked]})
