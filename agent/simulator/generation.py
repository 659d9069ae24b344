"""Deterministic "model output": the same key always gives the same tokens. Pure.

A key picks a token stream (words and punctuation, one token each for the tokenizer) and a
natural length: the step at which the model would sample its end-of-sequence token. Tokens do
not depend on the length asked for, so a shorter `max_tokens` gives a prefix of a longer one.

How a request's key is chosen (`base_key`), as sampling in vLLM behaves:

- ``temperature == 0`` (greedy): from the prompt only; every choice of ``n`` is the same.
- a ``seed``: from the seed only (not the prompt); choice ``i`` of ``n`` from (seed, i).
- neither: from the prompt; choice ``i`` from (prompt, i).

The server's own seed is mixed into all three.

Ending, in the order vLLM checks it after each generated token:

- EOS at the natural length (NATURAL_MIN..NATURAL_MAX tokens, the EOS included): finish_reason
  ``stop``, stop_reason None. The EOS token counts in ``completion_tokens`` but adds no text;
  a stream sends it as a last chunk with empty content. Not before ``min_tokens``, never with
  ``ignore_eos``.
- a stop string in the text (checked only once ``min_tokens`` tokens exist): the text is cut
  before it (after it with ``include_stop_str_in_output``), finish_reason ``stop``,
  stop_reason the string. While streaming, the last ``len(longest stop) - 1`` characters are
  held back so a stop string is never sent in part.
- ``max_tokens`` reached: finish_reason ``length``.

So a ``max_tokens`` below NATURAL_MIN always gives exactly ``max_tokens`` tokens and
``length`` when no stop string matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

NATURAL_MIN = 48
NATURAL_MAX = 96

WORDS = (
    "the", "model", "answer", "is", "a", "simple", "token", "stream", "that", "we", "can",
    "measure", "with", "care", "and", "it", "will", "stay", "the", "same", "for", "every",
    "run", "of", "this", "test", "because", "seed", "fixes", "all", "choices", "in", "order",
    "to", "keep", "numbers", "exact", "when", "gateway", "counts", "usage", "each", "request",
    "waits", "its", "turn", "queue", "moves", "forward", "as", "slots", "free", "up", "GPU",
    "memory", "holds", "keys", "values", "cache", "blocks", "fill", "then", "empty", "again",
    "latency", "grows", "under", "load", "while", "throughput", "rises", "until", "limit",
    "time", "first", "next", "words", "arrive", "one", "by", "small", "steps", "so", "clients",
    "see", "progress", "early", "server", "sends", "events", "over", "HTTP", "stops", "at",
    "end", "or", "length", "reached", "here", "there", "some", "many", "few", "more", "less",
    "good", "fast", "slow", "quiet", "clear", "bright", "plain", "useful", "careful", "ready",
    "node", "region", "tenant", "price", "bill", "meter", "route", "health", "score", "prompt",
    "reply", "story", "world",
)
_WORD_BITS = 7  # draws an index below 128
_WORD = re.compile(r"\w+")
assert len(WORDS) >= 1 << _WORD_BITS

_MASK = (1 << 64) - 1
_GREEDY, _SEEDED, _SAMPLED, _EMBED, _LOGPROB, _SCORE = 1, 2, 3, 4, 5, 6

EOS_TOKEN = "<|eot_id|>"
"""How the EOS token reads in logprobs (Llama 3's end of turn)."""


def mix(*parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): cheap, stable across processes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK
        h ^= h >> 29
    return h


def text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def chat_text(messages: Sequence[tuple[str, str]]) -> str:
    """What a chat prompt is keyed on: roles and contents, unambiguously joined."""
    return "\x1e".join(f"{role}\x1f{content}" for role, content in messages)


def base_key(*, server_seed: int, prompt: str, seed: int | None,
             temperature: float | None) -> tuple[int, bool]:
    """The request's key, and whether all its choices share it (greedy sampling)."""
    keyed = keyed_on_prompt(seed, temperature)
    return base_key_of(server_seed=server_seed, prompt_key=text_key(prompt) if keyed else 0,
                       seed=seed, temperature=temperature)


def keyed_on_prompt(seed: int | None, temperature: float | None) -> bool:
    """Whether the prompt is part of the key (not when a seed alone decides it)."""
    return temperature == 0 or seed is None


def base_key_of(*, server_seed: int, prompt_key: int, seed: int | None,
                temperature: float | None) -> tuple[int, bool]:
    """`base_key` from the prompt's `text_key` (unused when a seed decides)."""
    if temperature == 0:
        return mix(server_seed, _GREEDY, prompt_key), True
    if seed is not None:
        return mix(server_seed, _SEEDED, seed), False
    return mix(server_seed, _SAMPLED, prompt_key), False


def choice_key(base: int, index: int, shared: bool) -> int:
    return base if shared else mix(base, index)


def embedding_key(server_seed: int, text: str) -> int:
    return mix(server_seed, _EMBED, text_key(text))


def embedding_vector(key: int, dimensions: int) -> list[float]:
    """A unit vector: cosine similarity of two inputs is their dot product, as for real
    normalised embeddings."""
    rng = random.Random(key)
    vector = [rng.random() * 2.0 - 1.0 for _ in range(dimensions)]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChoiceOutput:
    text: str
    deltas: tuple[str, ...]
    """What a stream sends for each generated token, in order; joined they give `text`. One
    per token, so ``len(deltas) == num_tokens``; some may be empty (EOS, held back text)."""
    finish_reason: str
    stop_reason: str | None = None
    tokens: tuple[str, ...] = ()
    """Each generated token as text (EOS_TOKEN for the EOS), for logprobs: unlike `deltas`,
    never held back nor cut by a stop string."""
    key: int = 0
    """The choice's key: its logprobs are drawn from it."""
    start: int = 0
    """The step of the key's stream the output starts at (a continuation: the tokens
    already given); logprobs are drawn for steps ``start + i``."""

    @property
    def num_tokens(self) -> int:
        return len(self.deltas)


@dataclass(slots=True)
class _Stream:
    rng: random.Random
    natural: int
    pieces: list[str] = field(default_factory=list)
    sentence_start: bool = True
    after_punct: bool = True


class TextModel:
    """Token streams by key, cached: most keys come back (same prompt, same seed)."""

    def __init__(self, cache_size: int = 4096) -> None:
        self._streams: dict[int, _Stream] = {}
        self._cache_size = cache_size

    def _stream(self, key: int) -> _Stream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._remember(key, _new_stream(key))
        return stream

    def _remember(self, key: int, stream: _Stream) -> _Stream:
        if len(self._streams) >= self._cache_size:
            self._streams.clear()  # cheaper than LRU bookkeeping on the hot path
        self._streams[key] = stream
        return stream

    def natural_length(self, key: int) -> int:
        """Tokens the model generates when nothing stops it earlier, its EOS included."""
        return self._stream(key).natural

    def pieces(self, key: int, count: int) -> list[str]:
        """The first `count` visible tokens as text pieces (a leading space before words)."""
        pieces = _extend(self._stream(key), count)
        return pieces[:count] if len(pieces) > count else pieces

    def match_prefix(self, key: int, text: str, pos: int = 0) -> int | None:
        """How many tokens of `key`'s stream spell ``text[pos:]`` exactly (0 for an empty
        text), or None when it is no such prefix: it differs, or ends inside a token."""
        stream = self._streams.get(key)
        known = stream is not None
        if stream is None:
            stream = _new_stream(key)  # kept only if it matches: most probes do not
        pieces = stream.pieces
        count = 0
        end = len(text)
        while pos < end:
            if count == len(pieces):
                _extend(stream, count + 16)
            piece = pieces[count]
            if not text.startswith(piece, pos):
                return None
            pos += len(piece)
            count += 1
        if not known:
            self._remember(key, stream)
        return count

    def generate(self, key: int, sampling: Sampling, start: int = 0) -> ChoiceOutput:
        """The output of `key`'s stream from token `start` on (0: all of it; more: a
        continuation after `start` tokens already given). `sampling` counts new tokens
        only; the EOS stays where the whole stream has it (at once if `start` is past it)."""
        out = self._generate(key, sampling, start)
        n = out.num_tokens
        eos = out.finish_reason == "stop" and out.stop_reason is None
        pieces = self.pieces(key, start + (n - 1 if eos else n))[start:]
        tokens = (*pieces, EOS_TOKEN) if eos else tuple(pieces)
        return dataclasses.replace(out, tokens=tokens, key=key, start=start)

    def _generate(self, key: int, sampling: Sampling, start: int) -> ChoiceOutput:
        eos_step: int | None = None
        if not sampling.ignore_eos:
            eos_step = max(self.natural_length(key) - 1 - start, sampling.min_tokens)
        limit = sampling.max_tokens
        if limit <= 0:
            return ChoiceOutput("", (), "length")
        visible = limit if eos_step is None else min(limit, eos_step)
        pieces = self.pieces(key, start + visible)
        if start:
            pieces = pieces[start:]
        stops = tuple(s for s in sampling.stop if s)
        if not stops:
            if eos_step is not None and eos_step < limit:
                return ChoiceOutput("".join(pieces), (*pieces, ""), "stop")
            return ChoiceOutput("".join(pieces), tuple(pieces), "length")
        return _with_stop_strings(pieces, stops, sampling, eos_step)


def _new_stream(key: int) -> _Stream:
    rng = random.Random(key)
    return _Stream(rng, rng.randint(NATURAL_MIN, NATURAL_MAX))


def _extend(s: _Stream, count: int) -> list[str]:
    """Draws `s`'s pieces up to `count`: a capitalised first word, then words with a leading
    space, commas and full stops (a capital after each)."""
    pieces = s.pieces
    rng = s.rng
    while len(pieces) < count:
        r = rng.random()
        if not s.after_punct and r < 0.07:
            pieces.append(",")
            s.after_punct = True
        elif not s.after_punct and r < 0.13:
            pieces.append(".")
            s.after_punct = s.sentence_start = True
        else:
            word = WORDS[rng.getrandbits(_WORD_BITS)]
            if s.sentence_start:
                word = word[0].upper() + word[1:]
            pieces.append(word if not pieces else " " + word)
            s.after_punct = s.sentence_start = False
    return pieces


def _with_stop_strings(pieces: list[str], stops: tuple[str, ...], sampling: Sampling,
                       eos_step: int | None) -> ChoiceOutput:
    include = sampling.include_stop_str_in_output
    hold = 0 if include else max(len(s) for s in stops) - 1
    text = ""
    sent = 0
    deltas: list[str] = []
    for step in range(sampling.max_tokens):
        if step == eos_step:
            deltas.append(text[sent:])
            return ChoiceOutput(text, tuple(deltas), "stop")
        before = len(text)
        text += pieces[step]
        if step + 1 >= sampling.min_tokens:
            for stop in stops:  # the first listed that matches wins, as in vLLM
                at = text.find(stop, max(0, before - len(stop) + 1))
                if at != -1:
                    text = text[:at + len(stop)] if include else text[:at]
                    deltas.append(text[sent:])
                    return ChoiceOutput(text, tuple(deltas), "stop", stop)
        if step + 1 == sampling.max_tokens:
            break
        upto = max(sent, len(text) - hold)
        deltas.append(text[sent:upto])
        sent = upto
    deltas.append(text[sent:])
    return ChoiceOutput(text, tuple(deltas), "length")


# --------------------------------------------------------------------------- logprobs, scores


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]
    """The `top_logprobs` asked for, most likely first: the sampled token leads (the stand-in
    model always samples its most likely token), then alternatives less likely."""


def token_logprob(key: int, step: int, token: str, top: int) -> TokenLogprob:
    """The logprob of the token generated at `step` by the choice keyed `key`, with `top`
    alternatives (0: none). Deterministic; values in [-2.0, -0.001]."""
    h = mix(key, _LOGPROB, step)
    logprob = -round(0.001 + (h % 2000) / 1000, 3)
    if top <= 0:
        return TokenLogprob(token, logprob, ())
    space = " " if token.startswith(" ") or token == EOS_TOKEN else ""
    alternatives: list[tuple[str, float]] = [(token, logprob)]
    seen = {token}
    draw = 0
    value = logprob
    while len(alternatives) < top:
        draw += 1
        r = mix(h, draw)
        word = space + WORDS[r & ((1 << _WORD_BITS) - 1)]
        if word in seen:
            if draw < 8 * top:
                continue
            word = f"{word}{draw}"  # the word list ran short: any distinct token will do
        seen.add(word)
        value = round(value - 0.25 - ((r >> 8) % 500) / 1000, 3)
        alternatives.append((word, value))
    return TokenLogprob(token, logprob, tuple(alternatives))


def relevance_score(server_seed: int, query: str, document: str) -> float:
    """A cross-encoder's score in (0, 1): mostly how many of the query's words the document
    has, plus a little noise from both texts, so that reranking orders sensibly."""
    words = {w.lower() for w in _WORD.findall(query)}
    have = {w.lower() for w in _WORD.findall(document)}
    overlap = len(words & have) / len(words) if words else 0.0
    noise = (mix(server_seed, _SCORE, text_key(query), text_key(document)) % 10_000) / 10_000
    return round(0.02 + 0.76 * overlap + 0.2 * noise, 6)
