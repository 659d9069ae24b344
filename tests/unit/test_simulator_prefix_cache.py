"""The simulated prefix cache: block-wise, chained, salted in its first block (pure)."""

from __future__ import annotations

from agent.simulator.prefix_cache import PrefixCache

WORDS = " ".join(f"w{i}" for i in range(40))  # 40 tokens: 2 full blocks of 16, 8 left over


def test_a_repeated_prompt_hits_its_full_blocks() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    assert cache.query(None, WORDS) == (40, 0)
    assert cache.query(None, WORDS) == (40, 32)
    assert cache.query(None, WORDS + " and more") == (42, 32)  # a shared prefix
    assert cache.query(None, "other " + WORDS) == (41, 0)  # not a prefix


def test_only_an_equal_salt_shares_blocks() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    cache.query("tenant-a", WORDS)
    assert cache.query("tenant-b", WORDS)[1] == 0
    assert cache.query(None, WORDS)[1] == 0
    assert cache.query("tenant-a", WORDS)[1] == 32


def test_the_least_recently_used_blocks_go_first() -> None:
    cache = PrefixCache(capacity_blocks=2, block_size=16)
    cache.query("a", WORDS)
    cache.query("b", WORDS)  # evicts a's two blocks
    assert len(cache) == 2
    assert cache.query("a", WORDS)[1] == 0


def test_a_reset_forgets_every_block() -> None:
    from agent.simulator.prefix_cache import PrefixCache

    cache = PrefixCache(capacity_blocks=100, block_size=4)
    prompt = "one two three four five six seven eight nine"
    cache.query("t", prompt)
    assert cache.query("t", prompt)[1] > 0
    cache.reset()
    assert len(cache) == 0 and cache.query("t", prompt)[1] == 0
