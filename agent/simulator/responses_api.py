"""The OpenAI Responses API as vLLM serves it (``POST /v1/responses``, ``GET
/v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``): the response object, its stream of
typed events and the store of finished responses. Pure: no I/O, no clock.

Shapes follow vLLM 0.11's ``serving_responses.py`` and ``ResponsesResponse`` (dumped whole,
``model_dump()``: every field, nulls included), with two departures, both towards what the
openai SDK's stream helper needs and later vLLM does:

- a streamed text part keeps ``content_index`` 0 (0.11.0 raised it after every event, which
  ``client.responses.stream()`` cannot follow);
- the message item has one id, ``msg_<hex>``, in the events and in the final response (0.11
  streamed a bare uuid and put another id in ``response.completed``).

A stream is ``event: <type>\\ndata: <json>\\n\\n`` per event, numbered by
``sequence_number`` from 0, and ends after ``response.completed``: no ``data: [DONE]``.
Usage is only in ``response.completed`` (``created`` and ``in_progress`` carry ``null``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import msgspec

from agent.simulator.generation import ChoiceOutput
from agent.simulator.protocol import ApiError, ResponsesRequest
from agent.simulator.responses import Generation, logprobs_of

_json = msgspec.json.encode

RESPONSE_STORE_SIZE = 4096
"""Responses kept for GET and previous_response_id; vLLM keeps every one (it warns of the
leak), the simulator forgets the least recently used beyond this many."""

Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ResponsesMeta:
    """What a response echoes of its request, decided when it is prepared."""

    request: ResponsesRequest
    message_id: str
    max_output_tokens: int
    temperature: float
    top_p: float
    top_logprobs: int | None
    """vLLM's SamplingParams.logprobs: the count when logprobs are included, else null."""
    messages: Messages
    """The conversation the model read: what a follow-up (previous_response_id) continues."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    body: bytes
    messages: Messages
    output_text: str


class ResponseStore:
    """Finished responses by id (store=true), least recently used forgotten first."""

    def __init__(self, capacity: int = RESPONSE_STORE_SIZE) -> None:
        self._items: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> StoredResponse | None:
        item = self._items.get(response_id)
        if item is not None:
            self._items.move_to_end(response_id)
        return item

    def put(self, response_id: str, item: StoredResponse) -> None:
        self._items[response_id] = item
        self._items.move_to_end(response_id)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)


def response_not_found(response_id: str) -> ApiError:
    """vLLM's `_make_not_found_error` (GET, cancel and previous_response_id alike)."""
    return ApiError(404, f"Response with id '{response_id}' not found.",
                    "invalid_request_error")


def cannot_cancel() -> ApiError:
    """A stored response is finished: only a background one (not simulated) can be cancelled."""
    return ApiError(400, "Cannot cancel a synchronous response.", "invalid_request_error")


# --------------------------------------------------------------------------- bodies


def _meta(gen: Generation) -> ResponsesMeta:
    meta = gen.responses
    assert meta is not None, "not a Responses API generation"
    return meta


def response_object(gen: Generation, status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's ResponsesResponse.from_request, in its field order."""
    meta = _meta(gen)
    req = meta.request
    return {
        "id": gen.id, "created_at": gen.created, "incomplete_details": None,
        "instructions": req.instructions, "metadata": req.metadata, "model": gen.model,
        "object": "response", "output": output,
        "parallel_tool_calls": req.parallel_tool_calls, "temperature": meta.temperature,
        "tool_choice": req.tool_choice, "tools": req.tools, "top_p": meta.top_p,
        "background": bool(req.background), "max_output_tokens": meta.max_output_tokens,
        "max_tool_calls": req.max_tool_calls, "previous_response_id": req.previous_response_id,
        "prompt": None, "reasoning": req.reasoning, "service_tier": req.service_tier,
        "status": status, "text": req.text, "top_logprobs": meta.top_logprobs,
        "truncation": req.truncation, "usage": usage, "user": req.user,
        "input_messages": None, "output_messages": None,
    }


def usage(gen: Generation) -> dict[str, Any]:
    """vLLM's ResponseUsage for a plain (non-Harmony) model: per-turn lists stay empty."""
    output = gen.completion_tokens
    return {
        "input_tokens": gen.total_prompt_tokens,
        "input_tokens_details": {"cached_tokens": gen.cached_tokens,
                                 "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                  "output_tokens_per_turn": [],
                                  "tool_output_tokens_per_turn": []},
        "total_tokens": gen.total_prompt_tokens + output,
    }


def output_logprobs(choice: ChoiceOutput, top: int,
                    steps: range | None = None) -> list[dict[str, Any]]:
    """The output_text part's logprobs (openai's response_output_text.Logprob)."""
    return [{"token": t.token, "bytes": list(t.token.encode("utf-8", errors="replace")),
             "logprob": t.logprob,
             "top_logprobs": [{"token": tok, "bytes": list(tok.encode("utf-8", "replace")),
                               "logprob": lp} for tok, lp in t.top]}
            for t in logprobs_of(choice, top, steps)]


def _delta_logprobs(choice: ChoiceOutput, top: int, step: int) -> list[dict[str, Any]]:
    """A delta event's logprobs (openai's response_text_delta_event.Logprob: no bytes)."""
    return [{"token": t.token, "logprob": t.logprob,
             "top_logprobs": [{"token": tok, "logprob": lp} for tok, lp in t.top]}
            for t in logprobs_of(choice, top, range(step, step + 1))]


def _text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def output_items(gen: Generation) -> list[dict[str, Any]]:
    meta = _meta(gen)
    choice = gen.choices[0]
    if not choice.text:
        return []  # vLLM adds no message for an empty text
    logprobs = None if meta.top_logprobs is None else output_logprobs(choice, meta.top_logprobs)
    return [{"id": meta.message_id, "content": [_text_part(choice.text, logprobs)],
             "role": "assistant", "status": "completed", "type": "message"}]


def whole(gen: Generation) -> bytes:
    return _json(response_object(gen, "completed", output_items(gen), usage(gen)))


def stored(gen: Generation) -> StoredResponse:
    meta = _meta(gen)
    return StoredResponse(whole(gen), meta.messages, gen.choices[0].text)


# --------------------------------------------------------------------------- stream


def _event(kind: str, sequence: int, fields: dict[str, Any]) -> bytes:
    data = {**fields, "sequence_number": sequence, "type": kind}
    return b"event: " + kind.encode() + b"\ndata: " + _json(data) + b"\n\n"


class ResponsesStreamEncoder:
    """The typed events of one streamed response: `opening` with the headers, `first` with
    the first token, one `response.output_text.delta` per token, then `closing`."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.meta = _meta(gen)
        self._item = {"item_id": self.meta.message_id, "output_index": 0}
        # created, in_progress, output_item.added, content_part.added come before token 0.
        self._first_delta = 4

    def opening(self) -> bytes:
        initial = response_object(self.gen, "in_progress", [], None)
        return (_event("response.created", 0, {"response": initial})
                + _event("response.in_progress", 1, {"response": initial}))

    def first(self) -> bytes:
        item = {"id": self.meta.message_id, "content": [], "role": "assistant",
                "status": "in_progress", "type": "message"}
        return (_event("response.output_item.added", 2, {"item": item, "output_index": 0})
                + _event("response.content_part.added", 3,
                         {"content_index": 0, **self._item, "part": _text_part("", [])}))

    def step(self, step: int) -> bytes:
        choice = self.gen.choices[0]
        top = self.meta.top_logprobs
        logprobs = [] if top is None else _delta_logprobs(choice, top, step)
        return _event("response.output_text.delta", self._first_delta + step,
                      {"content_index": 0, "delta": choice.deltas[step], **self._item,
                       "logprobs": logprobs})

    def closing(self) -> bytes:
        gen = self.gen
        text = gen.choices[0].text
        seq = self._first_delta + gen.steps
        part = _text_part(text, None)
        item = {"id": self.meta.message_id, "content": [part], "role": "assistant",
                "status": "completed", "type": "message", "summary": []}
        return (_event("response.output_text.done", seq,
                       {"content_index": 0, **self._item, "logprobs": [], "text": text})
                + _event("response.content_part.done", seq + 1,
                         {"content_index": 0, **self._item, "part": part})
                + _event("response.output_item.done", seq + 2, {"item": item, "output_index": 0})
                + _event("response.completed", seq + 3, {
                    "response": response_object(gen, "completed", output_items(gen),
                                                usage(gen))}))

    def whole(self) -> bytes:
        parts = [self.opening(), self.first()]
        parts.extend(self.step(s) for s in range(self.gen.steps))
        parts.append(self.closing())
        return b"".join(parts)
