"""Resuming a cut stream (issue 16): what the client was sent, what another node is asked
for, and how its chunks are rewritten into the client's stream. Pure."""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway.protocol import InferenceRequest
from services.gateway.request_parsing import parse_request
from services.gateway.resume import Rewriter, Transcript, continuation_body

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None,
          usage: tuple[int, int] | None = None, cid: str = "chatcmpl-1", created: int = 100,
          **delta_extra: Any) -> bytes:
    delta: dict[str, Any] = dict(delta_extra)
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": "m", "choices": [{"index": 0, "delta": delta,
                                                       "finish_reason": finish}]}
    if usage:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": sum(usage)}
    return b"data: " + msgspec.json.encode(body) + b"\n"


def request(endpoint: str, **body: Any) -> InferenceRequest:
    payload = {"model": "m", "stream": True, **body}
    if endpoint == "chat":
        payload.setdefault("messages", MESSAGES)
    return parse_request(msgspec.json.encode(payload), endpoint, default_reserved=100, max_n=8,
                         max_batch_sequences=64, max_inputs=64, context_length=None,
                         cache_salt="t1")


def sent_of(*lines: bytes) -> Any:
    t = Transcript()
    for line in lines:
        t.add(line + b"\n")
    return t.sent()


def test_the_transcript_reads_what_the_client_got() -> None:
    sent = sent_of(chunk("", role="assistant"), chunk("Once"), chunk(" upon"))
    assert sent is not None
    assert (sent.id, sent.created, sent.model, sent.text) == ("chatcmpl-1", 100, "m",
                                                              "Once upon")
    assert sent.role_sent and sent.finish_reason is None and not sent.done


def test_a_chat_continues_its_own_answer_with_what_is_left_of_its_limits() -> None:
    req = request("chat", max_tokens=50, min_tokens=10)
    sent = sent_of(chunk("", role="assistant"), chunk("Once"), chunk(" upon"))
    body = continuation_body(req, sent, 2)
    assert body is not None
    assert body["messages"] == [*MESSAGES, {"role": "assistant", "content": "Once upon"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 48 and body["min_tokens"] == 8
    assert req.body["messages"] == MESSAGES  # the request itself is left alone


def test_a_completion_continues_from_its_prompt_and_text() -> None:
    req = request("completions", prompt="Once", max_tokens=10)
    t = Transcript()
    t.add(b'data: {"id":"cmpl-1","created":1,"model":"m","choices":[{"index":0,"text":" upon"}]}\n')
    sent = t.sent()
    assert sent is not None
    body = continuation_body(req, sent, 1)
    assert body is not None and body["prompt"] == "Once upon" and body["max_tokens"] == 9


def test_what_cannot_be_continued_is_not() -> None:
    sent = sent_of(chunk("x"))
    assert sent is not None
    assert continuation_body(request("chat", n=2), sent, 1) is None
    assert continuation_body(request("chat", stop=["."]), sent, 1) is None
    assert continuation_body(request("completions", prompt="a", echo=True), sent, 1) is None
    assert continuation_body(request("completions", prompt=["a", "b"]), sent, 1) is None
    assert continuation_body(request("embeddings", input="a", stream=False), sent, 1) is None
    # Tool calls or reasoning already sent: vLLM cannot continue those.
    assert sent_of(chunk(tool_calls=[{"index": 0, "function": {"name": "f"}}])) is None
    assert sent_of(chunk(reasoning_content="hmm")) is None
    t = Transcript()
    t.add(b"data: {not json\n")
    assert t.sent() is None


def test_the_continuation_reads_as_the_clients_stream_and_bills_once() -> None:
    sent = sent_of(chunk("", role="assistant", usage=(12, 0)), chunk("Once", usage=(12, 1)))
    assert sent is not None
    rewriter = Rewriter(sent, prompt_tokens=12, completion_tokens=1)
    # The new node's opening role chunk: already sent, dropped.
    assert rewriter.feed(chunk("", role="assistant", cid="other", created=999,
                               usage=(20, 0))) == b""
    out = rewriter.feed(chunk(" upon", cid="other", created=999, usage=(20, 1)))
    body = msgspec.json.decode(out[5:])
    assert body["id"] == "chatcmpl-1" and body["created"] == 100
    assert body["choices"][0]["delta"] == {"content": " upon"}
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    final = msgspec.json.decode(rewriter.feed(
        b'data: {"id":"other","created":9,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25}}\n')[5:])
    assert final["usage"]["completion_tokens"] == 6 and final["usage"]["prompt_tokens"] == 12
    assert rewriter.resume_prompt_tokens == 20  # the platform's prefill
    assert rewriter.feed(b"data: [DONE]\n") == b"data: [DONE]\n"
    assert rewriter.feed(b"\n") == b"\n"
