"""A deterministic stand-in for a model's tokenizer and chat template. Pure.

A token is a run of word characters (``\\w+``) or one other non-space character; whitespace is
never a token. So ``"Hello, world!"`` is 4 tokens: ``Hello`` ``,`` ``world`` ``!``.

Prompt token counts, as a Llama 3 style template and tokenizer would give them:

- completions: ``BOS + tokens(prompt)`` (BOS = 1), as vLLM adds special tokens to text prompts;
  a prompt given as token ids counts ``len(ids)``, nothing added.
- chat: ``BOS + sum(MESSAGE_OVERHEAD + tokens(content) for each message) + GENERATION_PROMPT``
  with MESSAGE_OVERHEAD = 5 (header start, role, header end, blank line, end of turn) and
  GENERATION_PROMPT = 4 (the assistant header), dropped when ``add_generation_prompt`` is false.
  A content given as parts counts the text of its ``text`` parts; other parts count nothing.
- embeddings: like completions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BOS = 1
MESSAGE_OVERHEAD = 5
GENERATION_PROMPT = 4

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def text_prompt_tokens(text: str) -> int:
    return BOS + count_tokens(text)


def chat_prompt_tokens(contents: Iterable[str], *, add_generation_prompt: bool = True) -> int:
    """`contents`: each message's text, in order (an empty string for a message without one)."""
    total = BOS
    for content in contents:
        total += MESSAGE_OVERHEAD + count_tokens(content)
    return total + (GENERATION_PROMPT if add_generation_prompt else 0)
