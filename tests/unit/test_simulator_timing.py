"""The simulated GPU's clock (agent/simulator/timing.py): prefill of what the prefix cache
does not hold, one request after another; decode steps that grow with the batch and stretch
while prefills are queued. Pure."""

from __future__ import annotations

import pytest

from agent.simulator.timing import GpuClock


def test_prefill_takes_the_uncached_tokens_one_request_after_another() -> None:
    clock = GpuClock(prefill_tokens_per_second=1000)
    assert clock.prefill(10.0, 500) == pytest.approx(10.5)
    # Queued behind the first: starts at 10.5, not at 10.1.
    assert clock.prefill(10.1, 1000) == pytest.approx(11.5)
    assert clock.prefill(10.2, 0) == 10.2  # all of it cached: nothing to wait for
    assert clock.prefill(20.0, 100) == pytest.approx(20.1)  # the GPU was idle again


def test_nothing_takes_time_by_default() -> None:
    clock = GpuClock()
    assert clock.prefill(5.0, 10_000) == 5.0
    assert clock.step(5.0, 64, 100) == 0.0


def test_a_decode_step_grows_with_the_batch_and_with_queued_prefill() -> None:
    clock = GpuClock(prefill_tokens_per_second=1000, inter_token_latency=0.01,
                     decode_seconds_per_seq=0.001)
    assert clock.step(0.0, 1, 10) == pytest.approx(0.01)
    assert clock.step(0.0, 33, 10) == pytest.approx(0.042)
    clock.prefill(0.0, 2000)  # two seconds of prefill queued
    # Decoding from t=1 for 100 steps: one second of prefill left, a hundredth a step.
    assert clock.step(1.0, 1, 100) == pytest.approx(0.02)
