"""Whether an event may arrive on a subject (schemas/arrival.py): every event type, typed and
as raw JSON, on its own subject and on every way of lying about it."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from schemas.arrival import canonical_stream, mismatch, raw_mismatch
from schemas.events import (
    PLATFORM,
    ApiKeyCreated,
    Event,
    NodeHeartbeat,
    NotificationSubscriptionCreated,
    UsageRecorded,
    encode_event,
)
from tests.helpers import node_accepted, node_registered, tenant_created

A, B = uuid.uuid4(), uuid.uuid4()


def heartbeat(node: uuid.UUID, **kw: Any) -> NodeHeartbeat:
    return NodeHeartbeat(node_id=node, sequence=1, health_score=90, vllm_healthy=True, **kw)


def apikey(tenant: uuid.UUID) -> ApiKeyCreated:
    return ApiKeyCreated(key_id=uuid.uuid4(), tenant_id=tenant, environment_id=uuid.uuid4(),
                         key_hash="0" * 64, last_four="abcd")


def usage(tenant: uuid.UUID) -> UsageRecorded:
    return UsageRecorded(request_id="r", tenant_id=tenant, environment_id=uuid.uuid4(),
                         api_key_id=uuid.uuid4(), model="m", endpoint="chat", region="r",
                         node_id=None, prompt_tokens=1, completion_tokens=1, latency_ms=1.0)


def raw(event: Event) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.json.decode(encode_event(event))
    return data


EVENTS: list[Event] = [
    heartbeat(A), node_registered(A), node_accepted(node_registered(A)), usage(A), apikey(A),
    tenant_created(), NotificationSubscriptionCreated(subscription_id=uuid.uuid4(),
                                                      kind="slack", target="x",
                                                      event_types=["node.*"]),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_an_event_may_arrive_on_its_own_subject(event: Event) -> None:
    assert mismatch(event, event.subject) is None
    assert raw_mismatch(raw(event), event.subject) is None


def test_a_platform_event_is_routed_by_the_platform_token() -> None:
    event = NotificationSubscriptionCreated(subscription_id=uuid.uuid4(), kind="slack",
                                            target="x", event_types=[])
    assert event.subject.endswith(f".{PLATFORM}")
    assert mismatch(event, event.subject) is None
    assert raw_mismatch(raw(event), event.subject) is None


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_another_routing_token_is_refused(event: Event) -> None:
    subject = f"{event.type}.{uuid.uuid4()}"
    assert mismatch(event, subject) is not None
    assert raw_mismatch(raw(event), subject) is not None


def test_a_heartbeat_of_node_b_on_node_a_s_subject_is_refused() -> None:
    wrong = heartbeat(B)
    reason = mismatch(wrong, f"node.heartbeat.{A}")
    assert reason is not None and str(B) in reason
    assert raw_mismatch(raw(wrong), f"node.heartbeat.{A}") is not None


@pytest.mark.parametrize("subject", [f"node.heartbeat.{A}", f"node.registered.{A}",
                                     f"node.accepted.{A}", f"apikey.created.{A}.x"])
def test_another_type_on_the_subject_is_refused(subject: str) -> None:
    """An `apikey.created` published on `node.>`: its subject names another type."""
    forged = apikey(A)
    assert mismatch(forged, subject) is not None
    assert raw_mismatch(raw(forged), subject) is not None


def test_a_stream_of_another_aggregate_is_refused() -> None:
    """A node event claiming `tenant:…` would land in the log under another aggregate."""
    forged = node_registered(A)
    forged.stream = f"tenant:{A}"
    assert canonical_stream(forged) == f"node:{A}"
    assert mismatch(forged, forged.subject) is not None
    assert raw_mismatch(raw(forged), forged.subject) is not None
    other_node = node_registered(A)
    other_node.stream = f"node:{B}"
    assert mismatch(other_node, other_node.subject) is not None


def test_raw_events_without_their_parts_are_refused() -> None:
    data = raw(heartbeat(A))
    assert raw_mismatch({**data, "type": 3}, f"node.heartbeat.{A}") is not None
    assert raw_mismatch({k: v for k, v in data.items() if k != "node_id"},
                        f"node.heartbeat.{A}") is not None
    # No stream: the typed decoder derives it, so the raw check does too.
    assert raw_mismatch({k: v for k, v in data.items() if k != "stream"},
                        f"node.heartbeat.{A}") is None


def test_a_type_this_build_does_not_know_is_routed_by_its_stream() -> None:
    """A newer writer during a rolling deploy: checked as far as it can be."""
    data = {"type": "node.future_thing", "stream": f"node:{A}", "id": str(uuid.uuid4())}
    assert raw_mismatch(data, f"node.future_thing.{A}") is None
    assert raw_mismatch(data, f"node.future_thing.{B}") is not None
    assert raw_mismatch({**data, "stream": ""}, f"node.future_thing.{A}") is not None


def test_parking_refused_observations_is_bounded() -> None:
    """A flood of bad heartbeats must not fill the dead-letter stream: a burst, then a rate."""
    from services.infra.bus import ParkBudget

    budget = ParkBudget(rate=10.0, burst=5.0)
    assert [budget.take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.take(0.05) is False  # half a token
    assert budget.take(0.1) is True
    assert sum(budget.take(10.0) for _ in range(100)) == 5  # never more than the burst
