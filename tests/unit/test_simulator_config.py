"""The simulator's settings, faults, CLI/environment and request parsing."""

from __future__ import annotations

import json

import pytest

from agent.simulator import Faults, SimulatorConfig
from agent.simulator.__main__ import config_from
from agent.simulator.config import ConfigError, merge_faults, validated
from agent.simulator.faults import FaultState
from agent.simulator.generation import ChoiceOutput
from agent.simulator.protocol import (
    ApiError,
    bad_request,
    decode_chat,
    decode_completion,
    validation_error,
)
from agent.simulator.responses import Generation, StreamEncoder


def test_defaults_and_validation() -> None:
    c = SimulatorConfig()
    assert (c.model, c.max_model_len, c.max_num_seqs, c.embedding_dimensions, c.seed) == (
        "meta-llama/Llama-3.1-8B-Instruct", 8192, 256, 384, 0)
    assert c.faults == Faults() and validated(c) == c
    with pytest.raises(ConfigError, match="max_num_seqs"):
        validated(SimulatorConfig(max_num_seqs=0))
    with pytest.raises(ConfigError, match="error_rate"):
        validated(SimulatorConfig(faults=Faults(error_rate=2)))


def test_faults_merge_partially_and_refuse_what_does_not_fit() -> None:
    f = merge_faults(Faults(slow_seconds=1), {"health_503": True})
    assert f == Faults(slow_seconds=1, health_503=True)
    assert merge_faults(f, {"hang_after_tokens": None}).hang_after_tokens is None
    for bad in ({"nope": 1}, {"error_rate": 1.5}, {"slow_seconds": "x"},
                {"drop_after_tokens": -1}, [1]):
        with pytest.raises(ConfigError):
            merge_faults(f, bad)


def test_fault_dice_are_seeded_and_extremes_are_certain() -> None:
    def rolls(seed: int) -> list[bool]:
        state = FaultState(Faults(), seed)
        return [state.fails(Faults(error_rate=0.5)) for _ in range(50)]

    assert rolls(1) == rolls(1) and 10 < sum(rolls(1)) < 40
    state = FaultState(Faults(), 0)
    assert all(state.fails(Faults(error_rate=1.0)) for _ in range(20))
    assert not any(state.fails(Faults()) for _ in range(20))


def test_the_earlier_of_hang_and_drop_wins() -> None:
    cut = FaultState.cut_after
    assert cut(Faults()) == (None, False)
    assert cut(Faults(hang_after_tokens=3)) == (3, False)
    assert cut(Faults(drop_after_tokens=3)) == (3, True)
    assert cut(Faults(hang_after_tokens=2, drop_after_tokens=3)) == (2, False)
    assert cut(Faults(hang_after_tokens=3, drop_after_tokens=3)) == (3, True)


def test_cli_flags_win_over_environment_over_defaults() -> None:
    env = {"SIM_MODEL": "env-model", "SIM_MAX_MODEL_LEN": "4096", "SIM_TTFT": "0.5",
           "SIM_HEALTH_503": "true", "SIM_HANG_AFTER_TOKENS": "7"}
    host, port, c, keys = config_from(["--model", "flag-model", "--itl", "0.01", "--port",
                                       "9"], env)
    assert (host, port, keys) == ("127.0.0.1", 9, [])
    assert (c.model, c.max_model_len, c.time_to_first_token, c.inter_token_latency) == (
        "flag-model", 4096, 0.5, 0.01)
    assert c.faults == Faults(health_503=True, hang_after_tokens=7)
    _, port, c, _ = config_from([], {})
    assert port == 8000 and c == SimulatorConfig()


def test_api_keys_as_vllm_reads_them() -> None:
    """`--api-key` wins over VLLM_API_KEY; an empty key is no key (no auth), as in vLLM."""
    env = {"VLLM_API_KEY": "from-env"}
    assert config_from([], env)[3] == ["from-env"]
    assert config_from(["--api-key", "a", "b"], env)[3] == ["a", "b"]
    assert config_from([], {"VLLM_API_KEY": ""})[3] == []
    assert config_from([], {})[3] == []


def test_requests_ignore_unknown_fields_and_name_bad_ones() -> None:
    req = decode_chat(b'{"messages": [{"role": "user", "content": "hi", "name": "x"}], '
                      b'"frobnicate": true, "stop": "a"}')
    assert req.stops() == ("a",) and req.messages[0].text() == "hi"
    parts = decode_chat(b'{"messages": [{"role": "user", "content": [{"type": "text", '
                        b'"text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}]}')
    assert parts.messages[0].text() == "a\nb"
    assert decode_completion(b'{"prompt": "x"}').max_tokens == 16  # vLLM's default
    with pytest.raises(ApiError) as info:
        decode_chat(b'{"messages": [], "n": "two"}')
    assert (info.value.status, info.value.type, info.value.param) == (400, "Bad Request",
                                                                      "body.n")
    missing = validation_error("Object missing required field `role` - at `$.messages[0]`")
    assert missing.param == "body.messages.0.role"
    assert "'msg': 'Field required'" in missing.message
    with pytest.raises(ApiError) as info:
        decode_chat(b"{nope")
    assert info.value.param == "body.0" and "json_invalid" in info.value.message


def test_error_bodies_have_vllms_shape() -> None:
    err = bad_request("too long", "input_tokens", 12)
    assert json.loads(err.body()) == {"error": {
        "message": "too long (parameter=input_tokens, value=12)", "type": "BadRequestError",
        "param": "input_tokens", "code": 400}}


def test_stream_chunks_are_json_events() -> None:
    choice = ChoiceOutput("Hi there", ("Hi", " there"), "length")
    gen = Generation(chat=True, id="chatcmpl-1", created=5, model="m", choices=[choice],
                     prompt_tokens=[3], total_prompt_tokens=3, stream=True, include_usage=True,
                     continuous_usage=True)
    events = StreamEncoder(gen).whole().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == ["Hi", " there"]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert [c["usage"]["completion_tokens"] for c in chunks[:3]] == [0, 1, 2]
    assert chunks[3] == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                         "model": "m", "choices": [],
                         "usage": {"prompt_tokens": 3, "total_tokens": 5,
                                   "completion_tokens": 2}}
