"""A deterministic stand-in for a model's tokenizer and chat template. Pure.

A token is a run of word characters (``\\w+``) or one other non-space character; whitespace is
never a token. So ``"Hello, world!"`` is 4 tokens: ``Hello`` ``,`` ``world`` ``!``.

Prompt token counts, as a Llama 3 style template and tokenizer would give them:

- completions: ``BOS + tokens(prompt)`` (BOS = 1), as vLLM adds special tokens to text prompts;
  a prompt given as token ids counts ``len(ids)``, nothing added.
- chat: ``BOS + sum(MESSAGE_OVERHEAD + tokens(content) for each message) + GENERATION_PROMPT``
  with MESSAGE_OVERHEAD = 5 (header start, role, header end, blank line, end of turn) and
  GENERATION_PROMPT = 4 (the assistant header), dropped when ``add_generation_prompt`` is false.
  With ``continue_final_message`` the final message is left open: its end of turn is dropped
  too (one token less), as vLLM renders it.
  A content given as parts counts the text of its ``text`` parts; other parts count nothing.
- embeddings: like completions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from services.domain.standin_tokenizer import (
    BLANK_LINE_ID,
    BOS_ID,
    END_HEADER_ID,
    EOT_ID,
    SPECIAL_TOKENS,
    START_HEADER_ID,
    piece_id,
    pieces,
)

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


def chat_prompt_tokens(contents: Iterable[str], *, add_generation_prompt: bool = True,
                       continue_final_message: bool = False) -> int:
    """`contents`: each message's text, in order (an empty string for a message without one).
    `continue_final_message` (with `add_generation_prompt` false): the last message left
    open, without its end of turn."""
    total = BOS
    messages = 0
    for content in contents:
        total += MESSAGE_OVERHEAD + count_tokens(content)
        messages += 1
    if continue_final_message and messages:
        return total - 1
    return total + (GENERATION_PROMPT if add_generation_prompt else 0)


# --------------------------------------------------------------------------- token ids
# The ids are services.domain.standin_tokenizer's (the gateway's kv_aware routing hashes the
# same); the simulator also remembers pieces, to decode.

_BPE_SPACE = {" ": "\u0120", "\n": "\u010a", "\t": "\u0109"}  # byte-level BPE's Ġ, Ċ, ĉ
KNOWN_PIECES = 65536


def token_str(piece: str) -> str:
    """What `convert_ids_to_tokens` shows: a leading space as the byte-level BPE's Ġ."""
    if piece and piece[0] in _BPE_SPACE:
        return _BPE_SPACE[piece[0]] + piece[1:]
    return piece


class Vocabulary:
    """Token ids for /tokenize and /detokenize: an id is a hash of its piece, so every
    process agrees; decoding knows the pieces it has encoded (a bounded table) and reads any
    other id in range as nothing."""

    def __init__(self, capacity: int = KNOWN_PIECES) -> None:
        self._pieces: dict[int, str] = {}
        self._capacity = capacity

    def encode(self, text: str) -> list[tuple[int, str]]:
        out = []
        for piece in pieces(text):
            token = piece_id(piece)
            if token not in self._pieces:
                if len(self._pieces) >= self._capacity:
                    self._pieces.clear()  # cheaper than LRU bookkeeping; ids stay stable
                self._pieces[token] = piece
            out.append((token, piece))
        return out

    def text_prompt(self, text: str) -> list[tuple[int, str]]:
        """A completion prompt: BOS, then the text's tokens (as `text_prompt_tokens` counts)."""
        return [(BOS_ID, SPECIAL_TOKENS[BOS_ID]), *self.encode(text)]

    def chat_prompt(self, messages: Iterable[tuple[str, str]], *,
                    add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[tuple[int, str]]:
        """The Llama 3 template, token for token as `chat_prompt_tokens` counts it."""
        out = [(BOS_ID, SPECIAL_TOKENS[BOS_ID])]
        for role, content in messages:
            out.extend(self._header(role))
            out.extend(self.encode(content))
            out.append((EOT_ID, SPECIAL_TOKENS[EOT_ID]))
        if continue_final_message and len(out) > 1:
            out.pop()  # the final message left open
        elif add_generation_prompt:
            out.extend(self._header("assistant"))
        return out

    def _header(self, role: str) -> list[tuple[int, str]]:
        role_id = piece_id(role)  # TokenIds.header's
        self._pieces.setdefault(role_id, role)
        return [(START_HEADER_ID, SPECIAL_TOKENS[START_HEADER_ID]), (role_id, role),
                (END_HEADER_ID, SPECIAL_TOKENS[END_HEADER_ID]),
                (BLANK_LINE_ID, SPECIAL_TOKENS[BLANK_LINE_ID])]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(SPECIAL_TOKENS.get(i) or self._pieces.get(i, "") for i in ids)


def token_strs(tokens: Iterable[tuple[int, str]]) -> list[str]:
    """`convert_ids_to_tokens` of a prompt: specials by name, the blank line as ĊĊ."""
    return ["\u010a\u010a" if i == BLANK_LINE_ID else token_str(piece) for i, piece in tokens]
