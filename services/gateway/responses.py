"""The Responses API's stream, as the gateway meters it. Pure.

vLLM streams a response as typed server-sent events (``event: <type>`` and ``data: {...}``
with the same `type`), from ``response.created`` to one final ``response.completed`` (or
``response.incomplete`` / ``response.failed``) that carries the whole response with its usage.
Unlike chat, there is no usage along the way, so the meter reads the final event; a stream
whose client hangs up is read on to that event (see proxy.py), and billed what the node
generated.

Every event is forwarded as it came: only the two that matter to the gateway are parsed (the
first, for the response's id; the last, for its usage), found by a byte search that the
far more numerous text deltas fail at C speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_WATCHED = (b'"response.created"', b'"response.completed"', b'"response.incomplete"',
            b'"response.failed"')


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0


class _Response(msgspec.Struct):
    id: str | None = None
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str = ""
    response: _Response | None = None


_event_decoder = msgspec.json.Decoder(_Event)


@dataclass
class ResponsesStreamMeter:
    """Follows a responses stream line by line; `feed(line)` returns what to forward (the line
    itself: nothing is held back or rewritten)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    response_id: str | None = None
    done: bool = False
    """The final event has been seen."""

    def feed(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        if payload == b"[DONE]":
            # Not something vLLM ends a responses stream with, but a node that does has
            # nothing after it.
            self.done = True
            return line
        if not any(marker in payload for marker in _WATCHED):
            return line
        try:
            event = _event_decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return line  # not ours to judge: forwarded as is
        if event.response is None:
            return line
        if event.type == "response.created" and self.response_id is None:
            self.response_id = event.response.id
        elif event.type in FINAL_EVENTS:
            self.done = True
            usage = event.response.usage
            if usage is not None:
                self.prompt_tokens = max(0, usage.input_tokens)
                self.completion_tokens = max(0, usage.output_tokens)
        return line
