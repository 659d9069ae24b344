"""Going on with a cut generation: the seam is exact, chat (``continue_final_message``) and
completions (the prompt followed by the text so far)."""

from __future__ import annotations

import pytest

from agent.simulator import SimulatorConfig
from agent.simulator.continuation import (
    OPEN,
    Keys,
    chat_choices,
    completion_choices,
    split_points,
)
from agent.simulator.generation import (
    EOS_TOKEN,
    ChoiceOutput,
    Sampling,
    TextModel,
    base_key,
    chat_text,
    choice_key,
)
from agent.simulator.prepare import Prepare
from agent.simulator.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    TokenizeRequest,
    check_generation_prompt,
    decode_chat,
    decode_tokenize,
)
from agent.simulator.responses import logprobs_of
from agent.simulator.tokenizer import Vocabulary, chat_prompt_tokens, count_tokens
from services.domain.standin_tokenizer import EOT_ID, TokenIds

HELLO = [("system", "Be brief."), ("user", "Hello, world!")]
PROMPT = "Write a story about a GPU: "
SAMPLED = Keys(0, None, None)
CUTS = (0, 1, 2, 5, 17, 33, 40)


def key_of(prompt: str, *, seed: int | None = None, temperature: float | None = None,
           choice: int = 0, server_seed: int = 0) -> int:
    base, shared = base_key(server_seed=server_seed, prompt=prompt, seed=seed,
                            temperature=temperature)
    return choice_key(base, choice, shared)


def whole(key: int, max_tokens: int = 10_000) -> ChoiceOutput:
    """The uninterrupted output."""
    return TextModel().generate(key, Sampling(max_tokens))


def given(key: int, k: int) -> str:
    """The text of the first `k` tokens, as a client got it before the cut."""
    return "".join(TextModel().pieces(key, k))


def inside_a_word(key: int) -> str:
    """The text so far cut inside a word: no seam."""
    k = next(k for k in range(5, 50) if len(TextModel().pieces(key, k)[-1]) > 2)
    return given(key, k)[:-1]


def chat_go_on(partial: str, max_tokens: int = 10_000, keys: Keys = SAMPLED,
               messages: list[tuple[str, str]] = HELLO, **sampling: object
               ) -> list[ChoiceOutput]:
    return chat_choices(TextModel(), keys, [*messages, ("assistant", partial)],
                        Sampling(max_tokens, **sampling))  # type: ignore[arg-type]


def completion_go_on(prompt: str, max_tokens: int = 10_000, keys: Keys = SAMPLED,
                     **sampling: object) -> list[ChoiceOutput]:
    return completion_choices(TextModel(), keys, prompt,
                              Sampling(max_tokens, **sampling))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- where to look


@pytest.mark.parametrize(("text", "points"), [
    ("x The model", [2]),                       # after a word it never writes
    ("end.The model, care. Run", [4, 21]),      # every capitalised word of the run
    ("a GPU", [2]), ("HTTP", []), ("The", []),  # never at 0
    ("catThe model", [3]),                      # glued to the prompt's last word
    ("Once upon a time", []), ("Hello, world!", []), ("word ", []), ("", []),
    ("Q: " + "the model " * 100 + "The end", [1003]),
    ("x" * 300 + " The model", [301]),          # read back past the first part read
])
def test_split_points(text: str, points: list[int]) -> None:
    assert split_points(text) == points


def test_split_points_stay_in_the_window() -> None:
    text = "x The" + " model" * 20
    assert split_points(text) == [2]
    assert split_points(text, window=len(text) - 3) == []


# --------------------------------------------------------------------------- the model


def test_match_prefix_counts_whole_tokens_only() -> None:
    key = key_of(PROMPT)
    model = TextModel()
    text = given(key, 9)
    assert model.match_prefix(key, text) == 9
    assert model.match_prefix(key, "") == 0
    assert model.match_prefix(key, "x" + text, 1) == 9
    assert model.match_prefix(key, text[:-1]) is None  # ends inside a token
    assert model.match_prefix(key, text + " zzz") is None
    assert TextModel().match_prefix(key + 1, text) is None


def test_generate_from_a_step_is_the_rest_and_keeps_the_eos() -> None:
    key = key_of(PROMPT)
    full = whole(key)
    natural = TextModel().natural_length(key)
    assert full.num_tokens == natural and full.finish_reason == "stop"
    for k in (*CUTS, natural - 2, natural - 1):
        out = TextModel().generate(key, Sampling(10_000), start=k)
        assert given(key, k) + out.text == full.text
        assert out.num_tokens == natural - k and out.finish_reason == "stop"
        assert out.tokens[-1] == EOS_TOKEN and out.start == k
    past = TextModel().generate(key, Sampling(10_000), start=natural + 5)
    assert (past.text, past.num_tokens, past.finish_reason) == ("", 1, "stop")


def test_limits_count_new_tokens_only() -> None:
    key = key_of(PROMPT)
    out = TextModel().generate(key, Sampling(5), start=10)
    assert (out.num_tokens, out.finish_reason) == (5, "length")
    assert out.text == "".join(TextModel().pieces(key, 15)[10:])
    natural = TextModel().natural_length(key)
    late = TextModel().generate(key, Sampling(50, min_tokens=3), start=natural + 5)
    assert late.num_tokens == 4 and late.finish_reason == "stop"  # 3, then the EOS
    endless = TextModel().generate(key, Sampling(20, ignore_eos=True), start=natural + 5)
    assert (endless.num_tokens, endless.finish_reason) == (20, "length")


def test_stop_strings_apply_to_new_text_only() -> None:
    key = key_of(PROMPT)
    full = whole(key)
    cut = given(key, 20)
    before = next(w for w in cut.split() if w.strip(",.") and w.strip(",.") not in
                  full.text[len(cut):])
    out = TextModel().generate(key, Sampling(10_000, stop=(before.strip(",."),)), start=20)
    assert cut + out.text == full.text  # only in the text given: no stop
    later = full.text[len(cut):].split()[3]
    out = TextModel().generate(key, Sampling(10_000, stop=(later,)), start=20)
    assert out.stop_reason == later and out.finish_reason == "stop"
    assert out.text == full.text[len(cut):].split(later)[0]


def test_logprobs_go_on_from_the_seam() -> None:
    key = key_of(PROMPT)
    full = TextModel().generate(key, Sampling(30))
    rest = TextModel().generate(key, Sampling(20), start=10)
    assert logprobs_of(rest, 2) == logprobs_of(full, 2)[10:]


# --------------------------------------------------------------------------- chat


def test_chat_goes_on_exactly_at_every_cut() -> None:
    key = key_of(chat_text(HELLO))
    full = whole(key)
    for k in CUTS:
        (out,) = chat_go_on(given(key, k))
        assert given(key, k) + out.text == full.text
        assert out.num_tokens == full.num_tokens - k and out.finish_reason == "stop"
        (short,) = chat_go_on(given(key, k), max_tokens=7)
        assert (short.num_tokens, short.finish_reason) == (7, "length")
        assert short.text == full.text[len(given(key, k)):][:len(short.text)]


def test_chat_not_a_prefix_gives_fresh_text() -> None:
    key = key_of(chat_text(HELLO))
    cut = given(key, 12)
    for partial in (inside_a_word(key), "Something else entirely.", cut + " zzz"):
        (out,) = chat_go_on(partial)
        open_key = key_of(chat_text([*HELLO, ("assistant", partial)]) + OPEN)
        assert out == TextModel().generate(open_key, Sampling(10_000))
        assert not (partial + out.text).startswith(whole(key).text[:len(partial) + 20])
    # A user message left open is the user's text going on, not an answer.
    (user,) = chat_choices(TextModel(), SAMPLED, [*HELLO[:1], ("user", cut)],
                           Sampling(10_000))
    assert user.key != key


def test_chat_continuation_of_a_continuation() -> None:
    """A client prefilled the answer; the stream was cut and is resumed: the seam holds."""
    prefill = "Sure thing:"
    (first,) = chat_go_on(prefill)
    so_far = prefill + "".join(TextModel().pieces(first.key, 9))
    (rest,) = chat_go_on(so_far)
    assert so_far + rest.text == prefill + first.text


def test_chat_key_rules_seeded_greedy_and_choices() -> None:
    seeded = Keys(0, 5, 0.7, n=2)
    for choice in (0, 1):
        key = key_of("ignored", seed=5, temperature=0.7, choice=choice)
        out = chat_go_on(given(key, 8), keys=seeded)[choice]
        assert given(key, 8) + out.text == whole(key).text
    other = chat_go_on(given(key_of("", seed=5, temperature=0.7), 8), keys=seeded)[1]
    assert other.start == 0  # choice 1's stream does not go on from choice 0's text
    greedy = key_of(chat_text(HELLO), temperature=0)
    outs = chat_go_on(given(greedy, 8), keys=Keys(0, None, 0, n=3))
    assert all(o is outs[0] for o in outs) and outs[0].start == 8
    assert given(greedy, 8) + outs[0].text == whole(greedy).text


# --------------------------------------------------------------------------- completions


def test_completion_goes_on_exactly_at_every_cut() -> None:
    key = key_of(PROMPT)
    full = whole(key)
    for k in CUTS:
        (out,) = completion_go_on(PROMPT + given(key, k))
        assert given(key, k) + out.text == full.text and out.finish_reason == "stop"
        assert out.num_tokens == full.num_tokens - k
        (short,) = completion_go_on(PROMPT + given(key, k), max_tokens=16)
        assert short.num_tokens == 16 and short.text == full.text[len(given(key, k)):][
            :len(short.text)]


def test_completion_without_a_seam_is_as_before() -> None:
    key = key_of(PROMPT)
    for prompt in (PROMPT, PROMPT + inside_a_word(key), "Once upon a time",
                   PROMPT + "The model"):
        (out,) = completion_go_on(prompt, 20)
        assert out == TextModel().generate(key_of(prompt), Sampling(20))


def test_completion_key_rules_and_a_prompt_ending_in_model_words() -> None:
    prompt = "Tell me. The GPU model: "  # words the model writes before the generated part
    key = key_of(prompt)
    (out,) = completion_go_on(prompt + given(key, 25))
    assert given(key, 25) + out.text == whole(key).text
    seeded = key_of("x", seed=9, temperature=1.0)
    (out,) = completion_go_on("Anything at all: " + given(seeded, 4), keys=Keys(0, 9, 1.0))
    assert given(seeded, 4) + out.text == whole(seeded).text
    glued = key_of("The cat")
    (out,) = completion_go_on("The cat" + given(glued, 3))
    assert out.start == 3 and given(glued, 3) + out.text == whole(glued).text


# --------------------------------------------------------------------------- requests


@pytest.fixture
def prep() -> Prepare:
    return Prepare(SimulatorConfig(model="m"))


def open_chat(partial: str, **fields: object) -> ChatCompletionRequest:
    messages = [ChatMessage(role=r, content=c) for r, c in [*HELLO, ("assistant", partial)]]
    return ChatCompletionRequest(messages=messages, **fields)  # type: ignore[arg-type]


def error(call: object) -> ApiError:
    assert callable(call)
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_both_flags_true_is_vllms_400() -> None:
    body = (b'{"messages":[{"role":"user","content":"x"}],"continue_final_message":true,'
            b'"add_generation_prompt":true}')
    e = error(lambda: check_generation_prompt(decode_chat(body)))
    assert (e.status, e.type, e.param) == (400, "Bad Request", "body")
    assert "Cannot set both `continue_final_message` and `add_generation_prompt` to True." \
        in e.message
    e = error(lambda: decode_tokenize(body))
    assert e.status == 400 and "Cannot set both" in e.message
    check_generation_prompt(decode_chat(body.replace(b"true}", b"false}")))


def test_continue_without_turning_the_generation_prompt_off(prep: Prepare) -> None:
    """vLLM lets it by (its check reads the body as sent); the chat template refuses it."""
    e = error(lambda: prep.chat(open_chat("Hi", continue_final_message=True), "x"))
    assert (e.status, e.type) == (400, "BadRequestError")
    assert e.message.startswith("continue_final_message and add_generation_prompt are not "
                                "compatible.")
    empty = ChatCompletionRequest(messages=[], continue_final_message=True,
                                  add_generation_prompt=False)
    assert error(lambda: prep.chat(empty, "x")).message == "list index out of range"
    e = error(lambda: prep.tokenize(TokenizeRequest(messages=[ChatMessage(role="user")],
                                                    continue_final_message=True)))
    assert e.status == 400


def test_a_continued_chat_through_prepare(prep: Prepare) -> None:
    key = key_of(chat_text(HELLO))
    cut = given(key, 17)
    gen = prep.chat(open_chat(cut, continue_final_message=True, add_generation_prompt=False,
                              max_tokens=33), "x")
    (out,) = gen.choices
    assert cut + out.text == whole(key, 50).text and out.num_tokens == 33
    # BOS, two closed messages, the open one without its end of turn, no header.
    assert gen.total_prompt_tokens == 1 + (5 + 3) + (5 + 4) + (5 + count_tokens(cut)) - 1
    assert chat_prompt_tokens(["a"], add_generation_prompt=False,
                              continue_final_message=True) == 1 + 5 + 1 - 1
    closed = prep.chat(open_chat(cut, add_generation_prompt=False, max_tokens=5), "x")
    assert closed.total_prompt_tokens == gen.total_prompt_tokens + 1


def test_a_continued_completion_through_prepare(prep: Prepare) -> None:
    key = key_of(PROMPT)
    cut = given(key, 17)
    gen = prep.completion(CompletionRequest(prompt=PROMPT + cut, max_tokens=33, echo=True),
                          "x")
    (out,) = gen.choices
    assert cut + out.text == whole(key, 50).text and out.num_tokens == 33
    assert gen.echo == [PROMPT + cut]  # the prompt as given
    batch = prep.completion(CompletionRequest(prompt=[PROMPT + cut], max_tokens=3), "x")
    assert batch.choices[0].start == 0  # a list of prompts is not looked into


def test_the_open_message_leaves_out_its_end_of_turn() -> None:
    messages = [*HELLO, ("assistant", "The model")]
    closed = TokenIds().chat_prompt(messages, add_generation_prompt=False)
    vocab = Vocabulary()
    opened = vocab.chat_prompt(messages, add_generation_prompt=False,
                               continue_final_message=True)
    assert [i for i, _ in opened] == closed[:-1] and closed[-1] == EOT_ID
    assert len(opened) == chat_prompt_tokens([c for _, c in messages],
                                             add_generation_prompt=False,
                                             continue_final_message=True)
