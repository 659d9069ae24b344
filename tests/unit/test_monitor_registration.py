"""Which registrations the monitor accepts (services/monitor/registration.py): only from a node
the orchestrator launched, still live, for its launch's model; a node's address never changes
once accepted; its region is the launch's. Which notices (spot warning, drain, leaving) it
records: only a launched node's, and nothing of a node that has ended. Every case."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from schemas.events import (
    Event,
    NodeAccepted,
    NodeDeregistered,
    NodeDraining,
    NodeLaunching,
    NodeRegistered,
    NodeSpotWarning,
    NodeStatus,
    NodeStatusChanged,
    NodeTerminated,
    NodeTerminateRequested,
)
from schemas.ids import uuid7, uuid7_ms
from services.monitor.registration import (
    NOTED,
    Accepted,
    Ignored,
    Notice,
    Refused,
    RefusedBecause,
    accepted_id,
    decide_notice,
    decide_registration,
)
from tests.helpers import node_accepted, node_registered

N = uuid7()
URL = "http://10.0.1.45:8000"


def launch(model: str = "llama-8b") -> NodeLaunching:
    return NodeLaunching(node_id=N, deployment_id=None, cluster_name="c", model_name=model,
                         provider="aws", region="us-east-1", gpu_type="A10G", spot=True,
                         deadline=datetime.now(UTC) + timedelta(minutes=10))


def registration(*, url: str = URL, model: str = "llama-8b") -> NodeRegistered:
    return msgspec.structs.replace(node_registered(N, model=model), endpoint_url=url)


def status(to: NodeStatus) -> NodeStatusChanged:
    return NodeStatusChanged(node_id=N, from_status=NodeStatus.ACTIVE, to_status=to)


def refused(history: list[Event], reg: NodeRegistered) -> RefusedBecause:
    decision = decide_registration(history, reg)
    assert isinstance(decision, Refused), decision
    assert decision.reason
    return decision.because


def test_a_launched_node_s_first_registration_is_accepted() -> None:
    reg = registration()
    decision = decide_registration([launch()], reg)
    assert isinstance(decision, Accepted)
    e = decision.event
    assert (e.node_id, e.registration_id, e.endpoint_url, e.model_name, e.region) == \
        (N, reg.id, URL, "llama-8b", "us-east-1")
    assert e.stream == f"node:{N}" and e.subject == f"node.accepted.{N}"
    assert e.metadata.causation_id == str(reg.id)


def test_a_node_never_launched_is_refused() -> None:
    assert refused([], registration()) is RefusedBecause.NOT_LAUNCHED
    # A registration in the log without a launch (from before the rule) does not launch it.
    assert refused([registration()], registration()) is RefusedBecause.NOT_LAUNCHED


@pytest.mark.parametrize("end", [
    NodeTerminated(node_id=N, reason="gone"), NodeDeregistered(node_id=N),
    status(NodeStatus.TERMINATED), status(NodeStatus.FAILED)], ids=lambda e: e.type)
def test_a_node_that_has_ended_is_refused(end: Event) -> None:
    reg = registration()
    assert refused([launch(), reg, node_accepted(reg), end], registration()) \
        is RefusedBecause.ENDED
    assert refused([launch(), end], registration()) is RefusedBecause.ENDED
    # Even a copy of the registration it was accepted with: the node is over.
    assert refused([launch(), reg, node_accepted(reg), end], reg) is RefusedBecause.ENDED


@pytest.mark.parametrize("alive", [
    status(NodeStatus.UNHEALTHY), status(NodeStatus.STALE), status(NodeStatus.DRAINING),
    NodeDraining(node_id=N, reason="spot"), NodeTerminateRequested(node_id=N, reason="x")],
    ids=lambda e: f"{e.type}-{getattr(e, 'to_status', '')}")
def test_a_node_not_ended_yet_may_register_again(alive: Event) -> None:
    reg = registration()
    again = registration()
    assert isinstance(decide_registration([launch(), reg, node_accepted(reg), alive], again),
                      Accepted)


def test_another_model_than_the_launch_s_is_refused() -> None:
    assert refused([launch("llama-8b")], registration(model="mistral-7b")) \
        is RefusedBecause.MODEL_MISMATCH
    reg = registration()
    assert refused([launch(), reg, node_accepted(reg)], registration(model="mistral-7b")) \
        is RefusedBecause.MODEL_MISMATCH


def test_an_accepted_node_s_address_never_changes() -> None:
    reg = registration()
    history: list[Event] = [launch(), reg, node_accepted(reg)]
    assert refused(history, registration(url="http://10.9.9.9:8000")) \
        is RefusedBecause.ENDPOINT_CHANGED
    # Nor after the node registered again at its own address.
    again = registration()
    history += [again, node_accepted(again)]
    assert refused(history, registration(url="http://attacker.example:8000")) \
        is RefusedBecause.ENDPOINT_CHANGED


def test_a_registration_recorded_before_node_accepted_existed_settles_the_address() -> None:
    assert refused([launch(), registration()], registration(url="http://10.9.9.9:8000")) \
        is RefusedBecause.ENDPOINT_CHANGED


def test_the_same_registration_again_is_accepted_with_the_same_acceptance() -> None:
    """An agent asking anew for its ack: the copy derives the very same event, kept once."""
    reg = registration()
    first = decide_registration([launch()], reg)
    again = decide_registration([launch(), reg, node_accepted(reg)], reg)
    assert isinstance(first, Accepted) and isinstance(again, Accepted)
    assert first.event.id == again.event.id == accepted_id(reg.id)


def test_an_agent_restarted_with_the_same_address_is_accepted() -> None:
    reg = registration()
    restarted = registration()
    decision = decide_registration([launch(), reg, node_accepted(reg)], restarted)
    assert isinstance(decision, Accepted)
    assert decision.event.registration_id == restarted.id
    assert decision.event.id != accepted_id(reg.id)


@pytest.mark.parametrize("change", [{"endpoint_url": "not a url"}, {"endpoint_url": ""},
                                    {"endpoint_url": "ftp://10.0.0.1/"}, {"model_name": " "},
                                    {"vram_total_gb": -1}])
def test_an_unusable_registration_is_refused_first(change: dict[str, object]) -> None:
    bad = msgspec.structs.replace(registration(), **change)
    assert refused([launch()], bad) is RefusedBecause.INVALID
    assert refused([], bad) is RefusedBecause.INVALID


def test_acceptance_ids_are_v7_of_the_registration_s_time_and_distinct() -> None:
    ids = {accepted_id(uuid7()) for _ in range(1000)}
    assert len(ids) == 1000
    reg = uuid7()
    derived = accepted_id(reg)
    assert derived.version == 7 and derived.variant == uuid.RFC_4122
    assert uuid7_ms(derived) == uuid7_ms(reg) and derived != reg


def test_an_acceptance_in_the_history_counts_as_the_settled_address() -> None:
    """Registrations accepted earlier in the same batch reach the decision as (registration,
    acceptance) pairs; an acceptance alone settles the address too."""
    acceptance = NodeAccepted(node_id=N, registration_id=uuid7(), endpoint_url=URL,
                              model_name="llama-8b", region="us-east-1")
    assert refused([launch(), acceptance], registration(url="http://other:1")) \
        is RefusedBecause.ENDPOINT_CHANGED
    assert isinstance(decide_registration([launch(), acceptance], registration()), Accepted)


def test_the_region_is_the_launch_s_not_the_agent_s() -> None:
    """Where the node runs is what the orchestrator asked the cloud for; an agent saying
    otherwise is still accepted (its address and model are what matter for routing)."""
    liar = msgspec.structs.replace(registration(), region="eu-west-1")
    decision = decide_registration([launch()], liar)
    assert isinstance(decision, Accepted)
    assert decision.event.region == "us-east-1"


# --------------------------------------------------------------------------- notices

NOTICES: list[Notice] = [NodeSpotWarning(node_id=N, provider="aws", action="terminate"),
                         NodeDraining(node_id=N, reason="SIGTERM"),
                         NodeDeregistered(node_id=N, reason="drained")]


def notice_ids(e: Notice) -> str:
    return e.type


@pytest.mark.parametrize("notice", NOTICES, ids=notice_ids)
def test_a_notice_of_a_node_never_launched_is_refused(notice: Notice) -> None:
    for history in ([], [registration()], [registration(), NodeDraining(node_id=N, reason="x")]):
        decision = decide_notice(history, notice)
        assert isinstance(decision, Refused)
        assert decision.because is RefusedBecause.NOT_LAUNCHED and "not launched" in \
            decision.reason


@pytest.mark.parametrize("notice", NOTICES, ids=notice_ids)
@pytest.mark.parametrize("history", [
    [launch()],
    [launch(), registration()],
    [launch(), registration(), status(NodeStatus.UNHEALTHY)],
    [launch(), NodeSpotWarning(node_id=N, provider="aws", action="terminate")],
    [launch(), registration(), NodeDraining(node_id=N, reason="SIGTERM")],
    [launch(), NodeTerminateRequested(node_id=N, reason="scale down")],
], ids=["launching", "registered", "unhealthy", "spot-warned", "draining", "to-terminate"])
def test_a_notice_of_a_live_launched_node_is_recorded(history: list[Event],
                                                      notice: Notice) -> None:
    assert decide_notice(history, notice) is NOTED


@pytest.mark.parametrize("notice", NOTICES, ids=notice_ids)
@pytest.mark.parametrize("end", [
    NodeTerminated(node_id=N, reason="gone"), NodeDeregistered(node_id=N),
    status(NodeStatus.TERMINATED), status(NodeStatus.FAILED)], ids=lambda e: e.type)
def test_a_notice_of_a_node_that_has_ended_is_acknowledged_not_recorded(
        end: Event, notice: Notice) -> None:
    """Most likely an honest agent's late word (its machine was taken down under it): not a
    refusal, which would raise the alert for lies, but nothing to record either."""
    reg = registration()
    for history in ([launch(), reg, node_accepted(reg), end], [launch(), end]):
        decision = decide_notice(history, notice)
        assert isinstance(decision, Ignored) and "has ended" in decision.reason
