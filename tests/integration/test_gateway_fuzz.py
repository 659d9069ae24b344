"""The gateway's inference routes under property-based fuzzing (Hypothesis): whatever the
body, no 5xx; every error in OpenAI's shape (the gateway's own with OpenAI's `type` strings);
and a request outside the documented bounds never reaches the node.

The oracle for "outside the bounds" is written here from docs/gateway.md's table, not taken
from the gateway's code, so the two are checked against each other."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.gateway_fixtures import MODEL, Platform, platform  # noqa: F401
from tests.redteam.test_gateway_and_nodes import served

CONTEXT = 8192  # the model's context_length in the platform fixture
OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                "not_found_error", "rate_limit_error", "server_error", "api_error"}
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
             "embeddings": "/v1/embeddings", "responses": "/v1/responses"}
BASE: dict[str, dict[str, Any]] = {
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "completions": {"model": MODEL, "prompt": "hi", "max_tokens": 3},
    "embeddings": {"model": MODEL, "input": "hi"},
    "responses": {"model": MODEL, "input": "hi", "max_output_tokens": 3},
}

huge = st.integers(min_value=-(2**70), max_value=2**70)
small = st.integers(min_value=-3, max_value=40)
scalars = st.one_of(st.none(), st.booleans(), small, huge,
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=8), st.just("a\x00b"))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12)


def edges(low: int, high: int) -> st.SearchStrategy[Any]:
    """Each side of a bound, far beyond it, and the wrong type: where bugs live."""
    return st.one_of(st.sampled_from([low - 1, high + 1]), st.integers(low, high),
                     st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30]),
                     scalars)


BOUNDED = {
    "n": edges(1, 8), "best_of": edges(1, 8),
    "max_tokens": edges(0, CONTEXT), "max_completion_tokens": edges(0, CONTEXT),
    "max_output_tokens": edges(0, CONTEXT), "min_tokens": edges(0, CONTEXT),
    "top_logprobs": edges(0, 20), "logprobs": edges(0, 20),
    "seed": edges(-(2**63), 2**63 - 1), "top_k": edges(-1, 2**31 - 1),
    "stop": st.one_of(st.lists(st.text(max_size=3), min_size=15, max_size=18), scalars),
}
FIELDS = {
    "temperature": scalars, "top_p": scalars, "stream": st.one_of(st.booleans(), scalars),
    "logit_bias": st.dictionaries(st.integers(0, 50).map(str), st.integers(-100, 100),
                                  max_size=4),
    "prompt": st.one_of(json_values, st.lists(st.text(max_size=5), max_size=70)),
    "input": st.one_of(json_values, st.lists(st.text(max_size=5), min_size=1, max_size=4)),
    "messages": json_values, "user": scalars, "previous_response_id": scalars,
    "store": st.just(False),  # the store is not what is fuzzed here
    "stream_options": json_values, "model": st.one_of(st.just(MODEL), scalars),
}


def refused_by_the_bounds(endpoint: str, body: dict[str, Any]) -> bool:
    """What docs/gateway.md says the gateway refuses before any node is asked (a subset:
    the numeric knobs and lists this fuzz draws)."""
    def outside(name: str, low: int, high: int) -> bool:
        value = body.get(name)
        if value is None:
            return False
        if isinstance(value, bool) or not isinstance(value, int):
            return True  # not an integer at all
        return not low <= value <= high

    if outside("seed", -(2**63), 2**63 - 1):
        return True
    if endpoint in ("chat", "completions"):
        if outside("n", 1, 8):
            return True
        n = body.get("n")
        if outside("best_of", n if isinstance(n, int) else 1, 8):
            return True
        if any(outside(name, 0, CONTEXT) for name in ("max_tokens", "max_completion_tokens",
                                                       "min_tokens")):
            return True
        if outside("top_k", -1, 2**31 - 1):
            return True
        if outside("top_logprobs" if endpoint == "chat" else "logprobs", 0, 20):
            return True
        stop = body.get("stop")
        if isinstance(stop, list) and len(stop) > 16:
            return True
    return endpoint == "responses" and (outside("max_output_tokens", 0, CONTEXT)
                                        or outside("top_logprobs", 0, 20))


@pytest.fixture
async def ready(platform: Platform) -> Platform:  # noqa: F811
    await platform.start_gateway(environment_requests_per_minute=0)
    await platform.add_node()
    await platform.routable(1)
    return platform


def some_of(fields: dict[str, st.SearchStrategy[Any]], most: int
            ) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=most).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))


@settings(max_examples=500, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(endpoint=st.sampled_from(sorted(ENDPOINTS)),
       knobs=some_of(BOUNDED, 3), changes=some_of(FIELDS, 3))
async def test_no_body_gets_a_5xx_and_out_of_bounds_never_reach_the_node(
        ready: Platform, endpoint: str, knobs: dict[str, Any], changes: dict[str, Any]
) -> None:
    p = ready
    body = {**BASE[endpoint], **changes, **knobs}
    before = await served(p.nodes[0])
    async with aiohttp.ClientSession() as s, s.post(
            p.gateway_url + ENDPOINTS[endpoint], data=msgspec.json.encode(body),
            headers={"Authorization": f"Bearer {p.key.plaintext}",
                     "Content-Type": "application/json"}) as r:
        raw = await r.read()
        status = r.status
    reached = await served(p.nodes[0]) > before
    assert status < 500, (status, raw[:300], body)
    if status >= 400:
        error = msgspec.json.decode(raw)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert {"type", "param", "code"} <= set(error)
        if not reached:  # the gateway's own refusal
            assert error["type"] in OPENAI_TYPES, error
    if refused_by_the_bounds(endpoint, body):
        assert status == 400 and not reached, (status, raw[:300], body)
