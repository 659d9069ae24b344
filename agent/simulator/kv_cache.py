"""The prefix cache as requests reach it: each prompt as the model's token ids
(services.domain.standin_tokenizer, the ids the gateway's `kv_aware` routing hashes), looked up
in the PrefixCache, counted in vLLM's prefix cache metrics, and its KV cache events handed to
whoever publishes them.

What is looked up, as vLLM tokenizes it: a chat's messages under the Llama 3 template (with
the assistant's header unless ``add_generation_prompt`` is false; without the final end of
turn with ``continue_final_message``, the final message left open); a completion's every
prompt, a string as BOS and its tokens, token ids as given; a response's whole conversation
(its previous responses' and its own input) under the chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from agent.simulator.metrics import EngineMetrics
from agent.simulator.prefix_cache import KvEvent, PrefixCache
from services.domain.standin_tokenizer import EOT_ID, TokenIds

__all__ = ["KvCache", "completion_ids"]


def completion_ids(token_ids: TokenIds, prompt: str | list[Any] | None) -> list[list[int]]:
    """A completion's prompts as token ids: a string, a list of strings, a list of token ids
    or a list of lists of them (already checked: anything else gives no prompt)."""
    if prompt is None or not prompt:
        return []
    if isinstance(prompt, str):
        return [token_ids.text_prompt(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [token_ids.text_prompt(p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt if isinstance(p, list)]


class KvCache:
    def __init__(self, cache: PrefixCache, token_ids: TokenIds, metrics: EngineMetrics) -> None:
        self.cache = cache
        self.token_ids = token_ids
        self.metrics = metrics
        self.on_events: Callable[[], None] | None = None
        """Called after a change that recorded events (the publisher's `schedule`)."""

    def chat(self, salt: str | None, messages: Iterable[tuple[str, str]], *,
             add_generation_prompt: bool = True, continue_final_message: bool = False) -> int:
        """Tokens found cached, for a chat (or responses) prompt."""
        ids = self.token_ids.chat_prompt(
            messages, add_generation_prompt=add_generation_prompt and not continue_final_message)
        if continue_final_message and ids[-1] == EOT_ID:
            ids.pop()  # the final message left open
        return self.query(salt, [ids])

    def completion(self, salt: str | None, prompt: str | list[Any] | None) -> int:
        """Tokens found cached, over all of a completion request's prompts."""
        return self.query(salt, completion_ids(self.token_ids, prompt))

    def query(self, salt: str | None, prompts: Iterable[list[int]]) -> int:
        hits = 0
        for ids in prompts:
            queried, hit = self.cache.query(salt, ids)
            self.metrics.prefix_cache_queries.inc(queried)
            self.metrics.prefix_cache_hits.inc(hit)
            hits += hit
        self._changed()
        return hits

    def reset(self) -> None:
        self.cache.reset()
        self._changed()

    def drain_events(self) -> list[KvEvent]:
        return self.cache.drain_events()

    def _changed(self) -> None:
        if self.on_events is not None:
            self.on_events()
