"""The simulator's rerank, score, tokenize and detokenize routes and its logprobs, over real
HTTP, in vLLM's shapes."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import MODEL, Sim, StartSim

start_sim = simulator_fixtures.start_sim
sim = simulator_fixtures.sim
client = simulator_fixtures.client

KEY = "clnk_extras-key-0123456789abcdefghijklmn"
HI: Any = [{"role": "user", "content": "Hello, world!"}]
DOCS = ["the GPU cache holds keys", "a story about the world", "nothing relevant here"]




async def post(url: str, body: Any, headers: dict[str, str] | None = None
               ) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        return r.status, await r.json()


# --------------------------------------------------------------------------- rerank, score


async def test_rerank_orders_by_relevance(sim: Sim) -> None:
    query = "GPU cache keys"
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        status, body = await post(f"{sim.url}{path}", {"model": MODEL, "query": query,
                                                       "documents": DOCS})
        assert status == 200, path
        assert list(body) == ["id", "model", "usage", "results"]
        assert body["id"].startswith("rerank-") and body["model"] == MODEL
        results = body["results"]
        assert results[0]["index"] == 0  # the document with the query's words
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert results[0]["document"] == {"text": DOCS[0], "multi_modal": None}
        # Each pair: BOS + query + separator + document + end.
        assert body["usage"] == {"total_tokens": sum(1 + 3 + len(d.split()) + 2 for d in DOCS)}
    status, body = await post(f"{sim.url}/v1/rerank",
                              {"query": query, "documents": DOCS, "top_n": 2})
    assert status == 200 and len(body["results"]) == 2


async def test_score_pairs_one_to_many_and_many_to_many(sim: Sim) -> None:
    status, body = await post(f"{sim.url}/v1/score",
                              {"model": MODEL, "text_1": "GPU cache", "text_2": DOCS})
    assert status == 200
    assert body["id"].startswith("score-") and body["object"] == "list"
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(3)]
    assert body["data"][0]["score"] > body["data"][2]["score"]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["usage"]["completion_tokens"] == 0

    status, pairs = await post(f"{sim.url}/score", {"text_1": ["a", "b"], "text_2": ["c", "d"]})
    assert status == 200 and len(pairs["data"]) == 2
    status, error = await post(f"{sim.url}/score", {"text_1": ["a", "b"], "text_2": DOCS})
    assert status == 400 and error == {"error": {
        "message": "Input lengths must be either 1:1, 1:N or N:N", "type": "BadRequestError",
        "param": None, "code": 400}}
    status, error = await post(f"{sim.url}/score", {"text_1": "a"})
    assert status == 400 and error["error"]["param"] == "body.text_2"


async def test_pooling_requests_go_through_the_engine(sim: Sim) -> None:
    await post(f"{sim.url}/v1/rerank", {"query": "q", "documents": ["a", "b"]},
               headers={"X-Request-Id": "abc"})
    m = await sim.metrics()
    assert m["vllm:prompt_tokens_total"] == 2 * (1 + 1 + 1 + 2)
    assert m["vllm:request_success_total{finished_reason=stop}"] == 2
    await sim.set_faults(error_rate=1.0)
    status, body = await post(f"{sim.url}/v1/score", {"text_1": "a", "text_2": "b"})
    assert status == 500 and body["error"]["type"] == "InternalServerError"


# --------------------------------------------------------------------------- tokenizer


async def test_tokenize_and_detokenize_round_trip(sim: Sim) -> None:
    status, body = await post(f"{sim.url}/tokenize", {"model": MODEL, "prompt": "Hello, world!",
                                                      "return_token_strs": True})
    assert status == 200
    assert list(body) == ["count", "max_model_len", "tokens", "token_strs"]
    assert body["count"] == len(body["tokens"]) == 1 + 4 and body["max_model_len"] == 8192
    assert body["tokens"][0] == 128000
    assert body["token_strs"] == ["<|begin_of_text|>", "Hello", ",", "\u0120world", "!"]
    status, text = await post(f"{sim.url}/detokenize", {"tokens": body["tokens"]})
    assert (status, text) == (200, {"prompt": "<|begin_of_text|>Hello, world!"})

    status, plain = await post(f"{sim.url}/tokenize", {"prompt": "Hello, world!",
                                                       "add_special_tokens": False})
    assert plain["tokens"] == body["tokens"][1:] and plain["token_strs"] is None

    status, chat = await post(f"{sim.url}/tokenize", {"messages": HI})
    assert status == 200 and chat["count"] == 1 + (5 + 4) + 4  # as chat counts its prompt
    status, error = await post(f"{sim.url}/tokenize", {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and error["error"]["type"] == "NotFoundError"


async def test_new_routes_want_the_key(start_sim: StartSim) -> None:
    sim = await start_sim(api_keys=[KEY])
    bodies = {"/tokenize": {"prompt": "x"}, "/detokenize": {"tokens": [1]},
              "/score": {"text_1": "a", "text_2": "b"}, "/v1/score": {"text_1": "a",
                                                                     "text_2": "b"},
              "/rerank": {"query": "a", "documents": ["b"]},
              "/v2/rerank": {"query": "a", "documents": ["b"]},
              "/v1/responses": {"input": "x", "max_output_tokens": 1}}
    for path, body in bodies.items():
        status, error = await post(f"{sim.url}{path}", body)
        assert (status, error) == (401, {"error": "Unauthorized"}), path
        status, _ = await post(f"{sim.url}{path}", body, {"Authorization": f"Bearer {KEY}"})
        assert status == 200, path


# --------------------------------------------------------------------------- logprobs


async def test_chat_logprobs_whole_and_streamed(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, seed=1,
                                             logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs and r.choices[0].logprobs.content
    assert content is not None and len(content) == 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob < 0
        assert t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 3
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and len({a.token for a in
                                                               t.top_logprobs}) == 3

    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4, seed=1, logprobs=True, top_logprobs=3,
        stream=True)]
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [c.choices[0].logprobs.content[0]  # type: ignore[index, union-attr]
                for c in chunks[1:]]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]

    plain = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert plain.choices[0].logprobs is None
    natural = await client.chat.completions.create(model=MODEL, messages=HI, seed=2,
                                                   logprobs=True)
    tokens = natural.choices[0].logprobs.content  # type: ignore[union-attr]
    assert tokens is not None and tokens[-1].token == "<|eot_id|>"
    assert all(t.top_logprobs == [] for t in tokens)


async def test_logprobs_bounds_are_vllms(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=HI, logprobs=True,
                                             top_logprobs=21)
    assert info.value.body == {
        "message": "Requested sample logprobs of 21, which is greater than max allowed: 20 "
                   "(parameter=logprobs, value=21)",
        "type": "BadRequestError", "param": "logprobs", "code": 400}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=HI, top_logprobs=2)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "top_logprobs"
    assert "`logprobs` must be set to true" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="greater than max allowed"):
        await client.completions.create(model=MODEL, prompt="x", logprobs=21)
    with pytest.raises(openai.BadRequestError, match="must be a positive value"):
        await client.completions.create(model=MODEL, prompt="x", logprobs=-2)


async def test_completion_logprobs_whole_and_streamed(client: AsyncOpenAI) -> None:
    r = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5,
                                        logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)]
    assert lp.top_logprobs is not None and lp.token_logprobs is not None
    assert all(len(top) == 2 and top[tok] == value for top, tok, value
               in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True))

    chunks = [c async for c in await client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, logprobs=2, stream=True)]
    streamed = [c.choices[0].logprobs for c in chunks]
    assert [s.tokens[0] for s in streamed] == lp.tokens  # type: ignore[union-attr,index]
    offsets = [s.text_offset[0] for s in streamed]  # type: ignore[union-attr,index]
    assert offsets == lp.text_offset

    echoed = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=2,
                                             logprobs=0, echo=True)
    echo_offsets = echoed.choices[0].logprobs.text_offset  # type: ignore[union-attr]
    assert echo_offsets is not None and echo_offsets[0] == len("Once upon")
