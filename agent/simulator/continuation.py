"""Going on with a generation that was cut short, as a model does when handed the text so far.
Pure.

A model continues whatever text it is given. A gateway that lost a node in the middle of a
stream resumes it on another node with nothing but vLLM's API:

- chat: the conversation plus the text received so far as a final assistant message, with
  ``continue_final_message: true`` and ``add_generation_prompt: false`` (the final message is
  left open: no end of turn, no new header);
- completions: ``prompt`` = the original prompt followed by the text received so far.

For that to be checkable the stand-in model gives exactly the rest of the original output.
It looks for the *seam*: a split ``s`` of the text such that what follows ``s`` is, token for
token, the start of the stream that what precedes ``s`` keys (with the request's own key rules:
greedy, seeded or sampled, `generation.base_key`). The output is that stream from the next
token on; `max_tokens`, `min_tokens` and stop strings count the new tokens only, and the EOS
stays where the whole stream has it (`TextModel.generate` with ``start``).

Where a generated text may start (`split_points`): only at a capitalised word (the stream's
first piece has no leading space), inside the trailing run of text shaped as the model writes
it (its words, single spaces before words, commas and full stops), within the last `WINDOW`
characters; the first `MAX_SPLITS` of them are tried, earliest (the longest generated part)
first. A prompt that does not end in such text costs a few character checks. Each choice
looks for its own seam (its key is derived from the split's prompt as usual); a choice that
finds none gets fresh output keyed on the whole text, as without a continuation.

Chat: the final message's content is the text. With an assistant message, the split at 0 is
tried first: an empty open assistant message is the generation prompt of the messages before
it, so its key is theirs (`chat_text` of them). Other splits key the conversation with the
final message cut at the split and left open (``OPEN`` after it); so does the fallback, so a
continuation of a continuation (a client's prefilled answer, resumed) also has its seam.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice

from agent.simulator.generation import (
    WORDS,
    ChoiceOutput,
    Sampling,
    TextModel,
    base_key_of,
    chat_text,
    choice_key,
    keyed_on_prompt,
    text_key,
)

__all__ = ["MAX_SPLITS", "OPEN", "WINDOW", "Keys", "chat_choices", "completion_choices",
           "split_points"]

WINDOW = 65536
"""Characters at the end of a text searched for the start of a generated part."""
MAX_SPLITS = 64
"""Split points tried per request, earliest first."""
OPEN = "\x1c"
"""Marks a chat keyed with its final message left open."""

_FORMS = frozenset(WORDS) | frozenset(w[0].upper() + w[1:] for w in WORDS)
_REV_PIECE = re.compile(r"([A-Za-z]+)( ?)|[,.]")
"""A piece as the model writes it, read backwards: a word and the space before it, or a comma
or a full stop."""


@dataclass(frozen=True, slots=True)
class Keys:
    """How a request's choices are keyed (`generation.base_key`'s rules)."""

    server_seed: int
    seed: int | None
    temperature: float | None
    n: int = 1

    @property
    def by_prompt(self) -> bool:
        return keyed_on_prompt(self.seed, self.temperature)

    def choices(self, prompt_key: int) -> list[int]:
        """Each choice's key, for a prompt whose `text_key` is `prompt_key`."""
        base, shared = base_key_of(server_seed=self.server_seed, prompt_key=prompt_key,
                                   seed=self.seed, temperature=self.temperature)
        return [choice_key(base, i, shared) for i in range(self.n)]


def split_points(text: str, *, window: int = WINDOW) -> list[int]:
    """Where a generated part may start in `text` (never at 0), ascending: each capitalised
    word of the trailing run shaped as the model writes, back to a word it never writes (a
    capitalised word glued to the end of such a word counts: ``"catThe"``)."""
    end = len(text)
    floor = max(0, end - window)
    points: list[int] = []
    size = 256
    rev = text[max(floor, end - size):][::-1]  # read backwards, in growing pieces
    pos = 0  # characters read from the end
    while True:
        piece = _REV_PIECE.match(rev, pos)
        cut = pos == len(rev) if piece is None else piece.end() == len(rev)
        if cut and len(rev) < end - floor:
            size *= 8  # the piece may go on before this part: read more
            rev = text[max(floor, end - size):][::-1]
            continue
        if piece is None:
            break
        pos = piece.end()
        reversed_word = piece.group(1)
        if reversed_word is None:
            continue  # a comma or a full stop
        word = reversed_word[::-1]
        at = end - piece.end(1)
        if word not in _FORMS:
            points.extend(at + i for i in range(1, len(word))
                          if word[i].isupper() and word[i - 1].islower() and word[i:] in _FORMS)
            break
        if word[0].isupper() and at > 0:
            points.append(at)
        if not piece.group(2):
            break  # no space before it: only a first word is written so
    points.reverse()
    return points


def completion_choices(model: TextModel, keys: Keys, prompt: str,
                       sampling: Sampling) -> list[ChoiceOutput]:
    """A text prompt's choices: the rest of a generation it ends with, else fresh ones."""
    points = split_points(prompt)
    splits: Iterable[tuple[int, int]] = (
        _hashes("", prompt, points, "") if keys.by_prompt else ((s, 0) for s in points))
    return _continued(model, keys, prompt, splits, text_key(prompt), sampling)


def chat_choices(model: TextModel, keys: Keys, messages: Sequence[tuple[str, str]],
                 sampling: Sampling) -> list[ChoiceOutput]:
    """The choices of a chat whose final message is left open (``continue_final_message``):
    the rest of a generation that message holds, else fresh ones."""
    *earlier, (role, content) = messages
    head = chat_text(earlier) + ("\x1e" if earlier else "") + role + "\x1f"
    points = split_points(content)
    splits: Iterable[tuple[int, int]] = (
        _hashes(head, content, points, OPEN) if keys.by_prompt else ((s, 0) for s in points))
    if role == "assistant":
        splits = chain(((0, text_key(chat_text(earlier))),), splits)
    return _continued(model, keys, content, splits, text_key(head + content + OPEN), sampling)


def fresh_choices(model: TextModel, keys: Keys, prompt: str,
                  sampling: Sampling) -> list[ChoiceOutput]:
    """A request's choices as keyed by `prompt`, no continuation looked for."""
    return _continued(model, keys, prompt, (), text_key(prompt) if keys.by_prompt else 0,
                      sampling)


def _continued(model: TextModel, keys: Keys, text: str, splits: Iterable[tuple[int, int]],
               fresh: int, sampling: Sampling) -> list[ChoiceOutput]:
    """Each choice continues its stream from the first split whose prompt's stream `text`
    goes on with; a choice none fits is keyed `fresh`."""
    found: dict[int, tuple[int, int]] = {}
    for s, prompt_key in islice(splits, MAX_SPLITS):
        probed: dict[int, int | None] = {}
        for i, key in enumerate(keys.choices(prompt_key)):
            if i in found:
                continue
            if key not in probed:
                probed[key] = model.match_prefix(key, text, s)
            start = probed[key]
            if start is not None:
                found[i] = (key, start)
        if len(found) == keys.n:
            break
    fresh_keys = keys.choices(fresh) if len(found) < keys.n else []
    outputs: dict[tuple[int, int], ChoiceOutput] = {}
    choices = []
    for i in range(keys.n):
        key, start = found.get(i) or (fresh_keys[i], 0)
        out = outputs.get((key, start))
        if out is None:
            out = outputs[key, start] = model.generate(key, sampling, start)
        choices.append(out)
    return choices


def _hashes(head: str, body: str, points: Iterable[int], tail: str
            ) -> Iterator[tuple[int, int]]:
    """``(s, text_key(head + body[:s] + tail))`` for ascending `points`, hashed as it goes:
    a long prompt is read once, not once a split."""
    h = hashlib.blake2b(head.encode(), digest_size=8)
    done = 0
    suffix = tail.encode()
    for s in points:
        h.update(body[done:s].encode())
        done = s
        t = h.copy()
        t.update(suffix)
        yield s, int.from_bytes(t.digest(), "little")
