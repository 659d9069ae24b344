"""The pure parts behind the simulator's Responses API, logprobs and tokenizer routes."""

from __future__ import annotations

import json

from agent.simulator.generation import (
    EOS_TOKEN,
    Sampling,
    TextModel,
    relevance_score,
    token_logprob,
)
from agent.simulator.protocol import ResponsesRequest
from agent.simulator.responses import Generation
from agent.simulator.responses_api import (
    ResponsesMeta,
    ResponsesStreamEncoder,
    ResponseStore,
    StoredResponse,
    whole,
)
from agent.simulator.tokenizer import (
    BOS_ID,
    Vocabulary,
    chat_prompt_tokens,
    text_prompt_tokens,
    token_strs,
)


def test_token_logprobs_are_deterministic_and_ranked() -> None:
    a = token_logprob(7, 3, " cache", 5)
    assert a == token_logprob(7, 3, " cache", 5)
    assert a != token_logprob(7, 4, " cache", 5)
    assert a.top[0] == (" cache", a.logprob) and len({t for t, _ in a.top}) == 5
    assert all(t.startswith(" ") for t, _ in a.top)
    values = [v for _, v in a.top]
    assert values == sorted(values, reverse=True) and -2.0 <= a.logprob <= -0.001
    assert token_logprob(7, 3, " cache", 0).top == ()


def test_generated_tokens_match_the_text() -> None:
    out = TextModel().generate(11, Sampling(max_tokens=1000))
    assert out.finish_reason == "stop" and out.tokens[-1] == EOS_TOKEN
    assert "".join(out.tokens[:-1]) == out.text and len(out.tokens) == out.num_tokens
    cut = TextModel().generate(11, Sampling(max_tokens=5, stop=(out.text.split(" ")[2],)))
    assert len(cut.tokens) == cut.num_tokens and cut.key == 11


def test_relevance_prefers_shared_words() -> None:
    assert relevance_score(0, "gpu cache", "the GPU cache") > relevance_score(
        0, "gpu cache", "a story")
    assert relevance_score(0, "q", "d") == relevance_score(0, "q", "d")


def test_vocabulary_round_trips_and_counts_as_the_tokenizer() -> None:
    vocab = Vocabulary()
    tokens = vocab.text_prompt("Hello,  world!\nBye")
    assert len(tokens) == text_prompt_tokens("Hello,  world!\nBye") and tokens[0][0] == BOS_ID
    assert vocab.decode(i for i, _ in tokens) == "<|begin_of_text|>Hello, world!\nBye"
    assert token_strs(tokens)[3:5] == ["\u0120world", "!"]
    assert Vocabulary().encode("world") == vocab.encode("world")  # ids agree across tables
    chat = vocab.chat_prompt([("system", "Be brief."), ("user", "Hi")])
    assert len(chat) == chat_prompt_tokens(["Be brief.", "Hi"])
    assert Vocabulary().decode([vocab.encode("unseen")[0][0]]) == ""


def test_store_forgets_the_least_recently_used() -> None:
    store = ResponseStore(capacity=2)
    item = StoredResponse(b"{}", (), "")
    store.put("a", item)
    store.put("b", item)
    assert store.get("a") is item  # now the most recent
    store.put("c", item)
    assert store.get("b") is None and store.get("a") is item and len(store) == 2


def _gen(stream: bool) -> Generation:
    choice = TextModel().generate(5, Sampling(max_tokens=3))
    req = ResponsesRequest(input="Hi")
    meta = ResponsesMeta(request=req, message_id="msg_1", max_output_tokens=3,
                         temperature=1.0, top_p=1.0, top_logprobs=None,
                         messages=(("user", "Hi"),))
    return Generation(chat=True, id="resp_1", created=9, model="m", choices=[choice],
                      prompt_tokens=[11], total_prompt_tokens=11, stream=stream,
                      responses=meta)


def test_stream_events_number_themselves_and_end_with_completed() -> None:
    gen = _gen(True)
    raw = ResponsesStreamEncoder(gen).whole().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    events = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    assert json.dumps(events[-1]["response"], separators=(",", ":")) == whole(gen).decode()
    assert not raw.endswith("data: [DONE]\n\n")
