"""The vLLM simulator's GPU-like timing: the queue, TTFT, KV cache, clients leaving."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from tests.helpers import eventually
from tests.integration import simulator_fixtures
from tests.integration.simulator_fixtures import MODEL, Sim, StartSim

start_sim = simulator_fixtures.start_sim

MESSAGES: Any = [{"role": "user", "content": "tell me a story"}]
PROMPT_TOKENS = 1 + 5 + 4 + 4


def client_for(sim: Sim, timeout: float = 10) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=sim.base_url, api_key="unused", max_retries=0,
                       timeout=timeout)


async def test_requests_beyond_max_num_seqs_wait_in_a_fifo_queue(start_sim: StartSim) -> None:
    sim = await start_sim(max_num_seqs=1, inter_token_latency=0.02)
    client = client_for(sim)
    started = time.monotonic()
    tasks = [asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10)) for _ in range(3)]

    async def queued() -> dict[str, float] | None:
        m = await sim.metrics()
        busy = m["vllm:num_requests_running"] == 1 and m["vllm:num_requests_waiting"] == 2
        return m if busy else None

    during = await eventually(queued, timeout=5, what="one running, two waiting")
    assert during is not None and 0 < during["vllm:kv_cache_usage_perc"] <= 1
    results = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    await client.close()
    assert all(r.choices[0].finish_reason == "length" for r in results)
    assert elapsed >= 3 * 9 * 0.02  # one after the other: 9 gaps between 10 tokens each

    after = await sim.metrics()
    assert (after["vllm:num_requests_running"], after["vllm:num_requests_waiting"],
            after["vllm:kv_cache_usage_perc"]) == (0, 0, 0)
    assert after["vllm:request_success_total{finished_reason=length}"] == 3
    assert after["vllm:generation_tokens_total"] == 30
    assert after["vllm:prompt_tokens_total"] == 3 * PROMPT_TOKENS
    assert after["vllm:e2e_request_latency_seconds_count"] == 3
    # The last one waited for the two before it.
    assert after["vllm:time_to_first_token_seconds_sum"] >= 0.5  # about 0 + 0.18 + 0.36


async def test_time_to_first_token_and_inter_token_latency(start_sim: StartSim) -> None:
    sim = await start_sim(time_to_first_token=0.25, inter_token_latency=0.03)
    client = client_for(sim)
    started = time.monotonic()
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  max_tokens=6, stream=True)
    arrivals = []
    async for _ in stream:
        arrivals.append(time.monotonic() - started)
    await client.close()
    assert len(arrivals) == 1 + 6
    assert arrivals[0] >= 0.25  # the role chunk comes with the first token
    assert arrivals[-1] >= 0.25 + 5 * 0.03  # the sixth token, five ITLs after the first
    m = await sim.metrics()
    assert m["vllm:time_to_first_token_seconds_count"] == 1
    assert 0.25 <= m["vllm:time_to_first_token_seconds_sum"] < 1.0


async def test_time_to_first_token_is_the_prefill_of_what_the_cache_does_not_hold(
        start_sim: StartSim) -> None:
    """A long prompt's first time costs its prefill (tokens / rate); the same prompt again is
    found in the prefix cache and answers at once; two uncached prompts at once prefill one
    after the other. (Sleeps only ever run long: the lower bounds hold on a busy machine, and
    the upper one leaves a second for it.)"""
    sim = await start_sim(prefill_tokens_per_second=500, block_size=16)
    client = client_for(sim)
    long: Any = [{"role": "user", "content": "the history of the world " * 200}]  # ~1000

    async def ttft(messages: Any) -> float:
        started = time.monotonic()
        stream = await client.chat.completions.create(model=MODEL, messages=messages,
                                                      max_tokens=2, stream=True)
        first = None
        async for _ in stream:
            first = first or time.monotonic() - started
        assert first is not None
        return first

    cold = await ttft(long)
    warm = await ttft(long)
    m = await sim.metrics()
    assert m["vllm:prefix_cache_hits_total"] >= 900  # the second time, all but a block
    assert cold >= 1.9  # ~1000 tokens at 500 a second
    assert warm < cold - 1.0
    # Two different prompts at once: the second waits for the first's prefill.
    others: Any = [[{"role": "user", "content": f"{word} " * 300}] for word in ("ox", "yak")]
    both = await asyncio.gather(*(ttft(o) for o in others))
    assert max(both) >= 1.1  # ~2 x 300 tokens, one after the other
    await client.close()


@pytest.mark.parametrize("plain", [False, True], ids=["handler-cancellation", "plain-runner"])
async def test_a_client_leaving_mid_stream_frees_its_slot(start_sim: StartSim,
                                                          plain: bool) -> None:
    sim = await start_sim(plain=plain, max_num_seqs=1, inter_token_latency=0.05)
    client = client_for(sim)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  max_tokens=40, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    assert (await sim.metrics())["vllm:num_requests_running"] == 1
    left = time.monotonic()
    await stream.close()

    async def freed() -> dict[str, float] | None:
        m = await sim.metrics()
        return m if m["vllm:num_requests_running"] == 0 else None

    m = await eventually(freed, timeout=2, what="the slot freed")
    assert m is not None
    assert time.monotonic() - left < 1.0  # at once, not after the ~2 s the stream had left
    assert m["vllm:request_success_total{finished_reason=abort}"] == 1
    assert m["vllm:kv_cache_usage_perc"] == 0
    # The next request runs at once.
    r = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    await client.close()


async def test_a_client_leaving_the_queue_gives_up_its_place(start_sim: StartSim) -> None:
    sim = await start_sim(max_num_seqs=1, inter_token_latency=0.05)
    client = client_for(sim)
    long = asyncio.create_task(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40))

    async def running() -> bool:
        return (await sim.metrics())["vllm:num_requests_running"] == 1

    await eventually(running, what="the long request running")
    impatient = client_for(sim, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await impatient.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                max_tokens=5)
    await impatient.close()

    async def dequeued() -> dict[str, float] | None:
        m = await sim.metrics()
        return m if m["vllm:num_requests_waiting"] == 0 else None

    m = await eventually(dequeued, timeout=2, what="the queue emptied")
    assert m is not None and m["vllm:num_requests_running"] == 1 and not long.done()
    long.cancel()
    await asyncio.gather(long, return_exceptions=True)
    await client.close()
