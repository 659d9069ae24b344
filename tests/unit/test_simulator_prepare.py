"""From a parsed request to its outputs: vLLM's checks, prompt counts, choices."""

from __future__ import annotations

from typing import Any

import pytest

from agent.simulator import SimulatorConfig
from agent.simulator.prepare import Prepare, completion_prompts
from agent.simulator.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    StreamOptions,
)


@pytest.fixture
def prep() -> Prepare:
    return Prepare(SimulatorConfig(model="m", max_model_len=100))


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[ChatMessage(role="user", content="a b c")],
                                 **fields)  # type: ignore[arg-type]


def error(call: object) -> ApiError:
    assert callable(call)
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_context_checks_word_what_vllm_says(prep: Prepare) -> None:
    assert prep.check_context(10, None, "max_tokens") == 90  # the rest of the context
    assert prep.check_context(10, 90, "max_tokens") == 90
    e = error(lambda: prep.check_context(11, 90, "max_tokens"))
    assert (e.status, e.type, e.param) == (400, "BadRequestError", "input_tokens")
    assert e.message.startswith("You passed 11 input tokens and requested 90 output tokens. ")
    assert e.message.endswith("maximum input length of 10 tokens. Please reduce the length of "
                              "the input prompt. (parameter=input_tokens, value=11)")
    e = error(lambda: prep.check_context(1, 101, "max_completion_tokens"))
    assert e.param == "max_completion_tokens"
    assert e.message.startswith("max_completion_tokens=101cannot be greater than")


def test_sampling_checks(prep: Prepare) -> None:
    for fields, text in (({"n": 0}, "n must be at least 1, got 0."),
                         ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
                         ({"temperature": -1.0}, "temperature must be non-negative"),
                         ({"min_tokens": 50, "max_tokens": 5}, "min_tokens must be less")):
        e = error(lambda f=fields: prep.chat(chat(**f), "chatcmpl-x"))
        assert e.message.startswith(text) and (e.status, e.param) == (400, None)


def test_chat_counts_the_template_and_answers_each_choice(prep: Prepare) -> None:
    gen = prep.chat(chat(n=2, max_tokens=4, seed=1, stream=True,
                         stream_options=StreamOptions(continuous_usage_stats=True)), "id-1")
    assert gen.total_prompt_tokens == 1 + 5 + 3 + 4 and gen.prompt_tokens == [13, 13]
    assert [c.num_tokens for c in gen.choices] == [4, 4]
    assert gen.choices[0].text != gen.choices[1].text
    assert (gen.id, gen.model, gen.include_usage, gen.continuous_usage) == ("id-1", "m", True,
                                                                          True)
    assert prep.chat(chat(max_completion_tokens=3, max_tokens=50), "x").choices[0] \
        .num_tokens == 3
    assert error(lambda: prep.chat(chat(model="other"), "x")).status == 404


def test_completion_prompts_in_every_form(prep: Prepare) -> None:
    assert completion_prompts("a b") == [("a b", 3, "a b")]
    assert [p[1] for p in completion_prompts(["a", "b c"])] == [2, 3]
    assert [p[1:] for p in completion_prompts([5, 6, 7])] == [(3, "")]
    assert [p[1] for p in completion_prompts([[1], [2, 3]])] == [1, 2]
    bad_prompts: list[Any] = [None, [], [1, "a"], [[]], [True], [-1]]
    for bad in bad_prompts:
        assert error(lambda b=bad: completion_prompts(b)).status == 400
    gen = prep.completion(CompletionRequest(prompt=["a", "b"], n=2, max_tokens=2, echo=True),
                          "cmpl-1")
    assert gen.total_prompt_tokens == 4 and gen.echo == ["a", "a", "b", "b"]
    assert len(gen.choices) == 4


def test_embeddings(prep: Prepare) -> None:
    vectors, tokens = prep.embeddings(EmbeddingRequest(input=["a", "b c"]))
    assert tokens == 2 + 3 and len(vectors) == 2 and len(vectors[0]) == 384
    assert error(lambda: prep.embeddings(EmbeddingRequest(input="a", dimensions=3))).status \
        == 400
    assert error(lambda: prep.embeddings(EmbeddingRequest(input="a",
                                                          encoding_format="x"))).status == 400
    assert error(lambda: prep.embeddings(EmbeddingRequest(input="x " * 200))).param \
        == "input_tokens"
