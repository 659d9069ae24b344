"""The agent's pure pieces: health score, vLLM metrics, spot notices, nvidia-smi, backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from agent.gpu import parse_nvidia_smi
from agent.health_score import HealthInputs, health_score
from agent.spot import parse_aws_instance_action, parse_azure_events, parse_gcp_preempted
from agent.vllm_metrics import MetricsError, parse_vllm_metrics, tokens_per_second
from services.infra.backoff import Backoff

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="0",model_name="other"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="other"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="llama"} 1500.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="llama"} 4.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="llama"} 5.0
vllm:time_to_first_token_seconds_sum{model_name="llama"} 0.9
vllm:time_to_first_token_seconds_count{model_name="llama"} 5.0
"""


# --------------------------------------------------------------------------- health score


@pytest.mark.parametrize(("inputs", "expected"), [
    (HealthInputs(vllm_healthy=False, metrics_ok=True), 0),
    (HealthInputs(vllm_healthy=False, metrics_ok=False, gpu_probe_failed=True), 0),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, num_requests_waiting=0,
                  kv_cache_usage=0.5), 100),
    (HealthInputs(vllm_healthy=True, metrics_ok=False), 60),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, kv_cache_usage=0.90), 85),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, kv_cache_usage=0.985), 70),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, num_requests_waiting=1), 97),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, num_requests_waiting=0.5), 98),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, num_requests_waiting=500), 70),
    (HealthInputs(vllm_healthy=True, metrics_ok=True, gpu_probe_failed=True), 90),
    (HealthInputs(vllm_healthy=True, metrics_ok=False, num_requests_waiting=50,
                  kv_cache_usage=0.99, gpu_probe_failed=True), 0),
])
def test_health_score(inputs: HealthInputs, expected: int) -> None:
    assert health_score(inputs) == expected


def test_health_score_never_rises_with_more_load() -> None:
    scores = [health_score(HealthInputs(vllm_healthy=True, metrics_ok=True,
                                        num_requests_waiting=w, kv_cache_usage=kv))
              for w in range(0, 20) for kv in (0.1, 0.5, 0.9, 0.99)]
    for w in range(19):
        for k in range(4):
            assert scores[(w + 1) * 4 + k] <= scores[w * 4 + k]
    assert all(0 <= s <= 100 for s in scores)


# --------------------------------------------------------------------------- vLLM metrics


def test_parse_vllm_metrics_for_one_model() -> None:
    load = parse_vllm_metrics(VLLM_METRICS, "llama")
    assert (load.running, load.waiting, load.kv_cache_usage) == (3.0, 2.0, 0.42)
    assert load.generation_tokens_total == 1500.0
    assert load.prompt_tokens_total is None


def test_parse_vllm_metrics_reads_the_only_model_served_under_another_name() -> None:
    """vLLM labels its series with its served model name (--served-model-name), which need not
    be MODEL_NAME: with one model served, its load is the node's."""
    one = "\n".join(line for line in VLLM_METRICS.splitlines() if "other" not in line)
    load = parse_vllm_metrics(one, "meta-llama/Llama-3.1-8B-Instruct")
    assert (load.running, load.waiting, load.model) == (3.0, 2.0, "llama")
    assert parse_vllm_metrics(one, "llama").model == "llama"


def test_parse_vllm_metrics_for_a_model_not_among_several_served() -> None:
    with pytest.raises(MetricsError, match="vLLM serves"):
        parse_vllm_metrics(VLLM_METRICS, "mistral")


def test_parse_vllm_metrics_without_model_labels() -> None:
    text = "vllm:num_requests_running 1\nvllm:num_requests_waiting 4\n"
    load = parse_vllm_metrics(text, "llama")
    assert (load.running, load.waiting, load.model) == (1.0, 4.0, None)


def test_parse_vllm_metrics_sums_models_when_none_given() -> None:
    load = parse_vllm_metrics(VLLM_METRICS)
    assert (load.running, load.waiting) == (10.0, 2.0)


def test_parse_legacy_kv_cache_name() -> None:
    text = VLLM_METRICS.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert parse_vllm_metrics(text, "llama").kv_cache_usage == 0.42


@pytest.mark.parametrize("text", ["", "garbage {{{", "# only comments\n",
                                  "vllm:num_requests_running 1\n"])
def test_broken_metrics_raise(text: str) -> None:
    with pytest.raises(MetricsError):
        parse_vllm_metrics(text)


@pytest.mark.parametrize("value", ["+Inf", "-Inf", "NaN"])
def test_non_finite_load_is_broken_metrics(value: str) -> None:
    """Valid exposition, but no number a score can use (int(inf) used to crash the beat)."""
    text = VLLM_METRICS.replace('waiting{engine="0",model_name="llama"} 2.0',
                                f'waiting{{engine="0",model_name="llama"}} {value}')
    with pytest.raises(MetricsError, match="finite"):
        parse_vllm_metrics(text, "llama")
    kv = VLLM_METRICS.replace("0.42", value)
    assert parse_vllm_metrics(kv, "llama").kv_cache_usage is None


def test_health_score_survives_non_finite_inputs() -> None:
    for bad in (float("inf"), float("nan"), float("-inf")):
        assert health_score(HealthInputs(vllm_healthy=True, metrics_ok=True,
                                         num_requests_waiting=bad)) == 60
        assert health_score(HealthInputs(vllm_healthy=True, metrics_ok=True,
                                         kv_cache_usage=bad)) == 60


def test_tokens_per_second() -> None:
    assert tokens_per_second(100, 400, 2.0) == 150.0
    assert tokens_per_second(None, 400, 2.0) is None
    assert tokens_per_second(100, None, 2.0) is None
    assert tokens_per_second(500, 10, 2.0) is None  # counter reset: vLLM restarted
    assert tokens_per_second(100, 200, 0) is None


# --------------------------------------------------------------------------- spot notices


def test_aws_instance_action() -> None:
    notice = parse_aws_instance_action({"action": "terminate", "time": "2026-11-26T08:22:00Z"})
    assert notice.provider == "aws" and notice.action == "terminate"
    assert notice.deadline == datetime(2026, 11, 26, 8, 22, tzinfo=UTC)


@pytest.mark.parametrize("body", [
    [], "terminate", None, 7,
    {"action": "terminate", "time": 1764145320},
    {"action": "terminate", "time": "soon"},
])
def test_aws_instance_action_that_is_not_the_documented_shape(body: object) -> None:
    with pytest.raises(ValueError, match=r"instance-action|isoformat"):
        parse_aws_instance_action(body)


def test_aws_instance_action_without_a_zone_is_utc() -> None:
    notice = parse_aws_instance_action({"action": "stop", "time": "2026-11-26T08:22:00"})
    assert notice.deadline == datetime(2026, 11, 26, 8, 22, tzinfo=UTC)


def test_gcp_preempted() -> None:
    now = datetime(2026, 11, 26, tzinfo=UTC)
    assert parse_gcp_preempted("FALSE", now) is None
    notice = parse_gcp_preempted("TRUE\n", now)
    assert notice is not None and notice.deadline == now + timedelta(seconds=30)


def test_azure_scheduled_events() -> None:
    assert parse_azure_events({"DocumentIncarnation": 1, "Events": []}) is None
    reboot = {"EventType": "Reboot", "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"}
    assert parse_azure_events({"Events": [reboot]}) is None
    preempt = {"EventType": "Preempt", "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"}
    notice = parse_azure_events({"Events": [reboot, preempt]})
    assert notice is not None
    assert notice.deadline == datetime(2016, 9, 19, 18, 29, 47, tzinfo=UTC)
    undated = parse_azure_events({"Events": [{"EventType": "Preempt", "NotBefore": ""}]})
    assert undated is not None and undated.deadline is None


@pytest.mark.parametrize("body", [
    [], "x", {"Events": {"EventType": "Preempt"}},
    {"Events": [{"EventType": "Preempt", "NotBefore": 1474309787}]},
    {"Events": [{"EventType": "Preempt", "NotBefore": "in a minute"}]},
])
def test_azure_events_that_are_not_the_documented_shape(body: object) -> None:
    with pytest.raises(ValueError, match=r"scheduled events|Events|NotBefore"):
        parse_azure_events(body)


# --------------------------------------------------------------------------- nvidia-smi, backoff


def test_nvidia_smi_mean_over_gpus() -> None:
    assert parse_nvidia_smi("80\n40\n") == 60.0
    with pytest.raises(ValueError, match="no GPUs"):
        parse_nvidia_smi("")
    with pytest.raises(ValueError, match="could not convert"):
        parse_nvidia_smi("[N/A]\n")


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(initial=1, maximum=5, factor=2, jitter=0, rng=random.Random(1))
    assert [b.next() for _ in range(5)] == [1, 2, 4, 5, 5]
    b.reset()
    assert b.next() == 1
    jittered = Backoff(initial=1, maximum=1, jitter=0.2, rng=random.Random(7))
    values = [jittered.next() for _ in range(100)]
    assert all(0.8 <= v <= 1.2 for v in values) and len(set(values)) > 50
    with pytest.raises(ValueError, match="bad backoff"):
        Backoff(initial=0)
