"""The simulator's tokenizer and its deterministic model output."""

from __future__ import annotations

import pytest

from agent.simulator.generation import (
    NATURAL_MAX,
    NATURAL_MIN,
    Sampling,
    TextModel,
    base_key,
    choice_key,
    embedding_key,
    embedding_vector,
)
from agent.simulator.tokenizer import (
    chat_prompt_tokens,
    count_tokens,
    text_prompt_tokens,
    tokenize,
)

# --------------------------------------------------------------------------- tokenizer


def test_words_and_punctuation_are_tokens_whitespace_is_not() -> None:
    assert tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    assert count_tokens("  a  b\n\tc ") == 3
    assert tokenize("it's 3.14") == ["it", "'", "s", "3", ".", "14"]


def test_prompt_counting_rules() -> None:
    assert text_prompt_tokens("Hello, world!") == 1 + 4
    assert text_prompt_tokens("") == 1
    # BOS + (5 + 2) + (5 + 4) + assistant header 4
    assert chat_prompt_tokens(["Be brief", "Hello, world!"]) == 1 + 7 + 9 + 4
    assert chat_prompt_tokens([""], add_generation_prompt=False) == 1 + 5


# --------------------------------------------------------------------------- generation


@pytest.fixture
def model() -> TextModel:
    return TextModel()


def test_same_key_same_output_and_shorter_is_a_prefix(model: TextModel) -> None:
    a = model.generate(42, Sampling(max_tokens=30))
    b = TextModel().generate(42, Sampling(max_tokens=30))
    assert a == b
    longer = model.generate(42, Sampling(max_tokens=40))
    assert longer.text.startswith(a.text)
    assert model.generate(43, Sampling(max_tokens=30)).text != a.text


def test_the_text_tokenizes_to_the_tokens_counted(model: TextModel) -> None:
    for key in range(50):
        out = model.generate(key, Sampling(max_tokens=20))
        assert out.num_tokens == 20 == count_tokens(out.text)
        assert "".join(out.deltas) == out.text


def test_natural_end_is_an_eos_token(model: TextModel) -> None:
    lengths = set()
    for key in range(200):
        out = model.generate(key, Sampling(max_tokens=1000))
        natural = model.natural_length(key)
        assert NATURAL_MIN <= natural <= NATURAL_MAX
        assert out.finish_reason == "stop" and out.stop_reason is None
        assert out.num_tokens == natural == count_tokens(out.text) + 1
        assert out.deltas[-1] == ""
        lengths.add(natural)
    assert len(lengths) > 20  # lengths vary


def test_max_tokens_below_the_natural_minimum_always_gives_length(model: TextModel) -> None:
    for key in range(100):
        out = model.generate(key, Sampling(max_tokens=NATURAL_MIN - 1))
        assert (out.finish_reason, out.num_tokens) == ("length", NATURAL_MIN - 1)


def test_max_tokens_equal_to_the_natural_length_still_stops(model: TextModel) -> None:
    natural = model.natural_length(7)
    assert model.generate(7, Sampling(max_tokens=natural)).finish_reason == "stop"
    assert model.generate(7, Sampling(max_tokens=natural - 1)).finish_reason == "length"


def test_ignore_eos_and_min_tokens(model: TextModel) -> None:
    natural = model.natural_length(5)
    out = model.generate(5, Sampling(max_tokens=natural + 30, ignore_eos=True))
    assert (out.finish_reason, out.num_tokens) == ("length", natural + 30)
    out = model.generate(5, Sampling(max_tokens=500, min_tokens=natural + 10))
    assert (out.finish_reason, out.num_tokens) == ("stop", natural + 11)


def test_stop_string_cuts_the_text_and_counts_the_token(model: TextModel) -> None:
    full = model.generate(9, Sampling(max_tokens=40))
    words = full.text.split(" ")
    stop = words[5]
    expected_text = full.text[:full.text.index(stop)]
    out = model.generate(9, Sampling(max_tokens=40, stop=("never-there", stop)))
    assert out.text == expected_text
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # The token that completed the stop string counts, and nothing after it.
    assert out.num_tokens == count_tokens(full.text[:full.text.index(stop) + len(stop)])
    assert "".join(out.deltas) == out.text

    kept = model.generate(9, Sampling(max_tokens=40, stop=(stop,),
                                      include_stop_str_in_output=True))
    assert kept.text == expected_text + stop


def test_streamed_deltas_never_show_a_stop_string_in_part(model: TextModel) -> None:
    full = model.generate(11, Sampling(max_tokens=40))
    stop = full.text[20:26]  # spans tokens
    out = model.generate(11, Sampling(max_tokens=40, stop=(stop,)))
    assert out.finish_reason == "stop"
    sent = ""
    for delta in out.deltas:
        sent += delta
        assert out.text.startswith(sent)  # nothing that the stop string later cuts is sent
    assert sent == out.text


def test_stop_strings_wait_for_min_tokens(model: TextModel) -> None:
    first = model.generate(9, Sampling(max_tokens=40)).text.split(" ")[0]
    out = model.generate(9, Sampling(max_tokens=40, stop=(first,)))
    assert (out.text, out.num_tokens, out.stop_reason) == ("", 1, first)
    # As vLLM: before min_tokens nothing is checked, and later checks look at new text only.
    out = model.generate(9, Sampling(max_tokens=40, stop=(first,), min_tokens=3))
    assert out.num_tokens >= 3 and out.text.startswith(first)


def test_no_stop_match_ends_by_length_with_all_text(model: TextModel) -> None:
    out = model.generate(3, Sampling(max_tokens=12, stop=("zzz-none",)))
    plain = model.generate(3, Sampling(max_tokens=12))
    assert (out.text, out.finish_reason, out.num_tokens) == (plain.text, "length", 12)
    assert "".join(out.deltas) == out.text


def test_keys_by_sampling_mode() -> None:
    greedy, shared = base_key(server_seed=0, prompt="p", seed=123, temperature=0)
    assert shared and greedy == base_key(server_seed=0, prompt="p", seed=9, temperature=0)[0]
    seeded, shared = base_key(server_seed=0, prompt="p", seed=123, temperature=0.7)
    assert not shared
    assert seeded == base_key(server_seed=0, prompt="other", seed=123, temperature=None)[0]
    assert seeded != base_key(server_seed=1, prompt="p", seed=123, temperature=0.7)[0]
    by_prompt, _ = base_key(server_seed=0, prompt="p", seed=None, temperature=None)
    assert by_prompt != base_key(server_seed=0, prompt="q", seed=None, temperature=None)[0]
    assert choice_key(seeded, 0, False) != choice_key(seeded, 1, False)
    assert choice_key(greedy, 0, True) == choice_key(greedy, 1, True) == greedy


def test_embeddings_are_deterministic_unit_vectors() -> None:
    a = embedding_vector(embedding_key(0, "hello"), 384)
    assert a == embedding_vector(embedding_key(0, "hello"), 384)
    assert len(a) == 384 and abs(sum(v * v for v in a) - 1) < 1e-9
    assert a != embedding_vector(embedding_key(0, "world"), 384)
