"""The simulated prefix cache over token ids: full blocks, hashes chained from a root and salted
in the first block, longest cached prefix, tail-first LRU eviction (pure)."""

from __future__ import annotations

from agent.simulator.prefix_cache import PrefixCache, block_hash, none_hash

IDS = list(range(1000, 1040))  # 40 ids: 2 full blocks of 16, 8 left over
ROOT = 12345


def ids(n: int, start: int = 5000) -> list[int]:
    return list(range(start, start + n))


def test_a_repeated_prompt_hits_its_full_blocks() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    assert cache.query(None, IDS) == (40, 0)
    assert cache.query(None, IDS) == (40, 32)
    assert cache.query(None, [*IDS, 7, 8]) == (42, 32)  # a shared prefix
    assert cache.query(None, [7, *IDS]) == (41, 0)  # not a prefix
    assert cache.query(None, IDS[:15]) == (15, 0)  # no full block: nothing to hit or cache
    assert len(cache) == 4


def test_the_hash_chain_is_determined_by_the_root_the_ids_and_the_salt() -> None:
    a = PrefixCache(capacity_blocks=100, block_size=16, root_hash=ROOT)
    b = PrefixCache(capacity_blocks=100, block_size=16, root_hash=ROOT)
    first = block_hash(ROOT, IDS[:16], ("s",))
    assert a.hashes("s", IDS) == b.hashes("s", IDS) == [
        first, block_hash(first, IDS[16:32], None)]  # the salt goes in the first block only
    unsalted = a.hashes(None, IDS)
    assert unsalted[0] == block_hash(ROOT, IDS[:16], None)
    assert all(0 <= h < 1 << 64 for h in unsalted)
    other_root = PrefixCache(capacity_blocks=100, block_size=16, root_hash=ROOT + 1)
    assert set(other_root.hashes(None, IDS)).isdisjoint(unsalted)


def test_the_root_is_random_unless_seeded() -> None:
    assert none_hash("0") == none_hash("0") != none_hash("1")
    assert none_hash(None) != none_hash(None)
    assert PrefixCache(10, 16).root_hash != PrefixCache(10, 16).root_hash


def test_only_an_equal_salt_shares_blocks() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=16, root_hash=ROOT)
    cache.query("tenant-a", IDS)
    assert cache.query("tenant-b", IDS)[1] == 0
    assert cache.query(None, IDS)[1] == 0
    assert cache.query("tenant-a", IDS)[1] == 32
    salted = [set(cache.hashes(salt, IDS)) for salt in ("tenant-a", "tenant-b", None)]
    assert not (salted[0] & salted[1]) and not (salted[0] & salted[2])
    assert len(cache) == 6  # every block of each salt, none shared


def test_a_prompts_tail_is_evicted_before_its_head() -> None:
    cache = PrefixCache(capacity_blocks=4, block_size=4, root_hash=ROOT)
    a = ids(12)  # 3 blocks
    a_hashes = cache.hashes(None, a)
    cache.query(None, a)
    assert cache.eviction_order() == a_hashes[::-1]
    cache.query(None, ids(8, start=9000))  # 2 blocks: one of a's must go, its last
    assert a_hashes[2] not in cache and a_hashes[0] in cache and a_hashes[1] in cache
    assert cache.query(None, a) == (12, 8)  # its head still hits


def test_the_least_recently_used_prompt_goes_first() -> None:
    cache = PrefixCache(capacity_blocks=4, block_size=4, root_hash=ROOT)
    a, b, c = ids(8, 100), ids(8, 200), ids(8, 300)
    cache.query(None, a)
    cache.query(None, b)
    cache.query(None, a)  # a used again: b is now the older
    cache.query(None, c)
    assert cache.query(None, a)[1] == 8
    assert cache.query(None, b)[1] == 0


def test_a_prompt_longer_than_the_cache_caches_its_head() -> None:
    cache = PrefixCache(capacity_blocks=2, block_size=4, root_hash=ROOT)
    assert cache.query(None, ids(20)) == (20, 0)
    assert cache.query(None, ids(20)) == (20, 8)
    assert len(cache) == 2


def test_a_reset_forgets_every_block() -> None:
    cache = PrefixCache(capacity_blocks=100, block_size=4)
    cache.query("t", ids(9))
    assert cache.query("t", ids(9))[1] == 8
    cache.reset()
    assert len(cache) == 0 and cache.query("t", ids(9))[1] == 0
