"""The simulator's scheduler: sequence slots, the FIFO queue, KV-cache blocks."""

from __future__ import annotations

from agent.simulator.scheduler import Scheduler


def test_runs_up_to_max_num_seqs_then_queues_in_order() -> None:
    s = Scheduler(max_num_seqs=2, kv_cache_tokens=10_000)
    assert s.submit(1, 1, 10) and s.submit(2, 1, 10)
    assert not s.submit(3, 1, 10) and not s.submit(4, 1, 10)
    assert (s.num_running, s.num_waiting) == (2, 2)
    assert s.finish(2) == [3]
    assert s.finish(1) == [4]
    assert (s.num_running, s.num_waiting) == (2, 0)
    assert s.finish(3) == [] and s.finish(4) == []
    assert (s.num_running, s.num_waiting, s.kv_cache_usage) == (0, 0, 0.0)


def test_a_newcomer_never_overtakes_the_queue() -> None:
    s = Scheduler(max_num_seqs=3, kv_cache_tokens=10_000)
    assert s.submit(1, 2, 10)
    assert not s.submit(2, 2, 10)  # needs 2, only 1 free
    assert not s.submit(3, 1, 10)  # 1 would fit, but 2 is ahead
    assert s.finish(1) == [2, 3]


def test_leaving_the_queue_frees_the_place_and_may_admit_those_behind() -> None:
    s = Scheduler(max_num_seqs=2, kv_cache_tokens=10_000)
    s.submit(1, 1, 10)
    s.submit(2, 2, 10)  # blocked: needs both slots
    s.submit(3, 1, 10)  # behind 2
    assert s.num_waiting == 3
    assert s.finish(2) == [3]  # the blocked head gave up
    assert (s.num_running, s.num_waiting) == (2, 0)
    assert s.finish(99) == []  # unknown ids are ignored


def test_choices_need_a_sequence_each_and_oversized_requests_still_run_alone() -> None:
    s = Scheduler(max_num_seqs=4, kv_cache_tokens=10_000)
    assert s.submit(1, 3, 10) and s.num_running == 3
    assert not s.submit(2, 10, 10)  # clamped to 4: waits for an empty engine
    assert s.finish(1) == [2]
    assert s.num_running == 4


def test_kv_cache_blocks_per_sequence_grow_and_bound_admission() -> None:
    s = Scheduler(max_num_seqs=100, kv_cache_tokens=160, block_size=16)  # 10 blocks
    assert s.submit(1, 1, 17)  # 2 blocks
    assert s.kv_cache_usage == 0.2
    s.grow(1, 33)  # 3 blocks
    assert s.kv_cache_usage == 0.3
    s.grow(1, 20)  # never shrinks while running
    assert s.kv_cache_usage == 0.3
    assert s.submit(2, 2, 40)  # 2 x 3 blocks: 9 of 10
    assert not s.submit(3, 1, 32)  # 2 more blocks do not fit
    assert s.finish(2) == [3]
    assert s.kv_cache_usage == 0.5
    s.grow(3, 1000)  # past capacity: reported as full, as vLLM would preempt
    assert s.kv_cache_usage == 1.0
    s.finish(1)
    s.finish(3)
    assert s.kv_cache_usage == 0.0


def test_a_prompt_bigger_than_the_cache_runs_on_an_idle_engine() -> None:
    s = Scheduler(max_num_seqs=4, kv_cache_tokens=64, block_size=16)
    assert s.submit(1, 1, 1000)
    assert s.kv_cache_usage == 1.0
