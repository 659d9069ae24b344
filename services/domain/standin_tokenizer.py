"""The token ids of the model the simulator stands in for: a deterministic, Llama 3 shaped
tokenizer and chat template. Pure.

Two parties must agree on them: the simulator, whose prefix cache holds blocks of these ids
(and reports them in its KV events, as vLLM does), and the gateway's `kv_aware` routing,
which hashes a prompt's blocks from the same ids to find the nodes that cache them. Against
a real model the gateway needs that model's tokenizer and chat template instead
(docs/routing.md).

A token is a run of word characters (``\\w+``) or one other non-space character, with at
most one whitespace character before it (as a byte-level BPE keeps it); an id is a hash of
that piece, so every process agrees without a vocabulary file. Chat is Llama 3's template:
``BOS``, then per message ``<|start_header_id|> role <|end_header_id|> \\n\\n content
<|eot_id|>``, then the assistant's header when a generation prompt is added.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

__all__ = [
    "BLANK_LINE_ID",
    "BOS_ID",
    "END_HEADER_ID",
    "EOT_ID",
    "SPECIAL_TOKENS",
    "START_HEADER_ID",
    "TokenIds",
    "piece_id",
    "pieces",
]

BOS_ID, START_HEADER_ID, END_HEADER_ID, EOT_ID = 128000, 128006, 128007, 128009
BLANK_LINE_ID: Final = 271
SPECIAL_TOKENS: Final = {BOS_ID: "<|begin_of_text|>", START_HEADER_ID: "<|start_header_id|>",
                         END_HEADER_ID: "<|end_header_id|>", EOT_ID: "<|eot_id|>",
                         BLANK_LINE_ID: "\n\n"}
_FIRST_ID, _LAST_ID = 1000, 127999  # ordinary tokens; below and above: Llama 3's specials
PIECE: Final = re.compile(r"(\s?)(\w+|[^\w\s])")


def pieces(text: str) -> list[str]:
    """The text's tokens with the whitespace right before each (at most one character):
    joined they give the text back, less runs of whitespace."""
    return [space + body for space, body in PIECE.findall(text)]


def piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode(), digest_size=8).digest()
    return _FIRST_ID + int.from_bytes(digest, "little") % (_LAST_ID - _FIRST_ID + 1)


class TokenIds:
    """Prompts as token ids; remembers the ids of up to `memory` pieces (a prompt repeats
    most of its pieces, and a dict lookup is ten times cheaper than the hash)."""

    def __init__(self, memory: int = 1 << 16) -> None:
        self._ids: dict[str, int] = {}
        self._memory = memory

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        out = []
        for space, body in PIECE.findall(text):
            piece = space + body
            token = ids.get(piece)
            if token is None:
                if len(ids) >= self._memory:
                    ids.clear()  # cheaper than LRU bookkeeping; ids stay stable
                token = ids[piece] = piece_id(piece)
            out.append(token)
        return out

    def text_prompt(self, text: str) -> list[int]:
        """A completion prompt: BOS, then the text's tokens (vLLM adds special tokens)."""
        return [BOS_ID, *self.encode(text)]

    def chat_prompt(self, messages: Iterable[tuple[str, str]], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Llama 3's template over (role, text) messages."""
        out = [BOS_ID]
        for role, content in messages:
            out += self.header(role)
            out += self.encode(content)
            out.append(EOT_ID)
        if add_generation_prompt:
            out += self.header("assistant")
        return out

    @staticmethod
    def header(role: str) -> list[int]:
        return [START_HEADER_ID, piece_id(role), END_HEADER_ID, BLANK_LINE_ID]
