"""A request's prompt as the node will cache it: token ids in blocks, each named as
kv_index names the blocks it learns from the nodes (issue 15, `kv_aware`). Pure.

The ids must be the node's own, so this needs the served model's tokenizer and chat
template: here, the stand-in the simulator serves (services/core/standin_tokenizer.py). The
prompt is read lazily, a message at a time, and hashed a block at a time only as far as the
index asks (a prompt no node has seen stops after its first block), and never past
`max_tokens`. Each message's ids are remembered (bounded): a conversation repeats its earlier
turns and a tenant its system prompt, so most of a request's text is tokenized once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from services.core.standin_tokenizer import BOS_ID, EOT_ID, TokenIds
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

    def keys(self, endpoint: str, body: Mapping[str, Any], salt: str | None,
             block_size: int) -> Iterator[bytes]:
        """The keys of the prompt's full blocks, in order (nothing for a request whose prompt
        this cannot read: a batch's later prompts, the Responses API's stored turns)."""
        parent, extra = ROOT, None if salt is None else [salt]
        pending: list[int] = []
        left = self.max_tokens // block_size
        for chunk in self._ids(endpoint, body):
            pending += chunk
            start = 0
            while len(pending) - start >= block_size and left > 0:
                parent = block_key(parent, pending[start:start + block_size], extra)
                extra = None
                start += block_size
                left -= 1
                yield parent
            if left <= 0:
                return
            del pending[:start]

    def _ids(self, endpoint: str, body: Mapping[str, Any]) -> Iterator[Sequence[int]]:
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return
            yield (BOS_ID,)
            for message in messages:
                if not isinstance(message, dict):
                    return
                role = message.get("role")
                yield self.tokenizer.header(role if isinstance(role, str) else "")
                yield self._encode(_text(message.get("content")))
                yield (EOT_ID,)
            if body.get("add_generation_prompt", True) is not False:
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
