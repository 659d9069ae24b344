"""A request's prompt as the node will cache it: token ids in blocks, each named as
kv_index names the blocks it learns from the nodes (issue 15, `kv_aware`). Pure.

The ids must be the node's own, so this needs the served model's tokenizer and chat
template: here, the stand-in the simulator serves (services/domain/standin_tokenizer.py). The
prompt is read lazily, a message at a time, and hashed a block at a time only as far as the
index asks (a prompt no node has seen stops after its first block), and never past
`max_tokens`. Each message's ids are remembered (bounded): a conversation repeats its earlier
turns and a tenant its system prompt, so most of a request's text is tokenized once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.domain.standin_tokenizer import BOS_ID, EOT_ID, TokenIds
from services.gateway.kv_index import ROOT, block_key

__all__ = ["PromptBlocks"]


class PromptBlocks:
    def __init__(self, tokenizer: TokenIds | None = None, *, max_tokens: int = 8192,
                 memory_chars: int = 32 << 20) -> None:
        self.tokenizer = tokenizer or TokenIds()
        self.max_tokens = max_tokens
        self._memo: dict[str, list[int]] = {}
        self._memo_chars = 0
        self._memory_chars = memory_chars
        self._heads: dict[tuple[str | None, int, str, str], _Head] = {}
        self._head_keys = 0
        self._memory_keys = memory_chars // 64

    def keys(self, endpoint: str, body: Mapping[str, Any], salt: str | None,
             block_size: int) -> Iterator[bytes]:
        """The keys of the prompt's full blocks, in order (nothing for a request whose prompt
        this cannot read: a batch's later prompts, the Responses API's stored turns)."""
        chain = _Chain(ROOT, None if salt is None else [salt], block_size,
                       self.max_tokens // block_size)
        head = self._head(endpoint, body, salt, block_size)
        if head is not None:
            # A system prompt every request of an app repeats: its blocks are hashed once.
            yield from head.keys[:chain.left]
            chain.resume_after(head)
        for chunk in self._ids(endpoint, body, after_first=head is not None):
            if chain.left <= 0:
                return
            yield from chain.feed(chunk)

    def _head(self, endpoint: str, body: Mapping[str, Any], salt: str | None,
              block_size: int) -> _Head | None:
        """The first message's blocks, remembered (bounded), when it is a long one."""
        messages = body.get("messages") if endpoint == "chat" else None
        if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict) \
                or (len(messages) == 1 and body.get("continue_final_message") is True):
            return None
        first = messages[0]
        role, content = first.get("role"), first.get("content")
        if not isinstance(role, str) or not isinstance(content, str) \
                or len(content) < HEAD_CHARS:
            return None
        memo_key = (salt, block_size, role, content)
        head = self._heads.get(memo_key)
        if head is None:
            chain = _Chain(ROOT, None if salt is None else [salt], block_size,
                           self.max_tokens // block_size)
            keys: list[bytes] = []
            for chunk in ((BOS_ID,), self.tokenizer.header(role), self._encode(content),
                          (EOT_ID,)):
                keys += chain.feed(chunk)
            head = _Head(keys, chain.pending, chain.extra)
            if self._head_keys + len(keys) > self._memory_keys:
                self._heads.clear()
                self._head_keys = 0
            self._heads[memo_key] = head
            self._head_keys += len(keys)
        return head

    def _ids(self, endpoint: str, body: Mapping[str, Any], *, after_first: bool = False
             ) -> Iterator[Sequence[int]]:
        """The prompt's ids, a piece at a time (`after_first`: a chat's after its first
        message)."""
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return
            if not after_first:
                yield (BOS_ID,)
            # A continued final message stays open (vLLM's continue_final_message).
            open_last = body.get("continue_final_message") is True
            rest = messages[1:] if after_first else messages
            for i, message in enumerate(rest, 1):
                if not isinstance(message, dict):
                    return
                role = message.get("role")
                yield self.tokenizer.header(role if isinstance(role, str) else "")
                yield self._encode(_text(message.get("content")))
                if not (open_last and i == len(rest)):
                    yield (EOT_ID,)
            if body.get("add_generation_prompt", True) is not False and not open_last:
                yield self.tokenizer.header("assistant")
        elif endpoint == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch: routed by its first prompt
            if isinstance(prompt, str):
                yield (BOS_ID,)
                yield self._encode(prompt)
            elif isinstance(prompt, list) and all(type(i) is int for i in prompt):
                yield prompt

    def _encode(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text)
            if self._memo_chars + len(text) > self._memory_chars:
                self._memo.clear()
                self._memo_chars = 0
            self._memo[text] = ids
            self._memo_chars += len(text)
        return ids


def _text(content: object) -> str:
    """A message's text as the node's chat template reads it: a string, or its text parts
    joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict)
                         and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


HEAD_CHARS = 1024
"""A first message this long has its blocks remembered (a short one is cheap to hash)."""


@dataclass(frozen=True, slots=True)
class _Head:
    keys: list[bytes]
    pending: list[int]
    """Its ids past its last full block: the start of the next block."""
    extra: list[str] | None
    """The next block's extra keys (the salt, when no block is full yet)."""


@dataclass(slots=True)
class _Chain:
    """Blocks' keys as ids arrive: each full block's key chained to the one before."""

    parent: bytes
    extra: list[str] | None
    block_size: int
    left: int
    pending: list[int] = field(default_factory=list)

    def feed(self, chunk: Sequence[int]) -> list[bytes]:
        pending = self.pending
        pending += chunk
        size = self.block_size
        start = 0
        out = []
        while len(pending) - start >= size and self.left > 0:
            self.parent = block_key(self.parent, pending[start:start + size], self.extra)
            self.extra = None
            start += size
            self.left -= 1
            out.append(self.parent)
        del pending[:start]
        return out

    def resume_after(self, head: _Head) -> None:
        """Go on after a remembered first message."""
        used = min(len(head.keys), self.left)
        self.left -= used
        if used < len(head.keys):
            self.left = 0
            return
        if head.keys:
            self.parent = head.keys[-1]
        self.extra = head.extra
        self.pending = list(head.pending)
