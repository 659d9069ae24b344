"""The reconciler's plan for one deployment, rule by rule (see the module docstring of
services/orchestrator/reconciler.py)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import NodeStatus as S
from services.domain.fleet import NodeView
from services.orchestrator.reconciler import (
    DeploymentSpec,
    Fail,
    Launch,
    Plan,
    Situation,
    Terminate,
    bare_region,
    plan_deployment,
    replacement_budget,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(minutes=5)

EAST, WEST, CENTRAL = "aws/us-east-1", "aws/us-west-2", "aws/ca-central-1"


def dep(*, regions: tuple[str, ...] = (EAST, WEST), spot: bool = True, min_nodes: int = 0,
        max_nodes: int = 10, fallback: bool = True) -> DeploymentSpec:
    return DeploymentSpec(id=uuid.UUID(int=1), model_name="meta-llama/Llama-3.1-8B-Instruct",
                          regions=regions, gpu_type="A10G", spot=spot, min_nodes=min_nodes,
                          max_nodes=max_nodes, allow_on_demand_fallback=fallback)


def node(status: S = S.ACTIVE, *, region: str = "us-east-1", age: timedelta = timedelta(hours=1),
         deadline: datetime | None = None, terminate_requested: datetime | None = None,
         spot: bool = True, since: timedelta | None = None) -> NodeView:
    """A node as the fleet reports it: `region` is bare (no cloud), `age` how long ago it
    registered (or was launched), `since` how long it has been in its status (default: a minute,
    or its age if younger)."""
    node_id = uuid.uuid4()
    return NodeView(id=node_id, status=status, deployment_id=uuid.UUID(int=1),
                    cluster_name=f"crosslogic-test-{node_id.hex[-8:]}",
                    model_name="meta-llama/Llama-3.1-8B-Instruct", region=region,
                    endpoint_url="" if status == S.LAUNCHING else "http://10.0.0.1:8000",
                    spot_instance=spot, launch_deadline=deadline,
                    terminate_requested_at=terminate_requested, registered_at=NOW - age,
                    status_since=NOW - (min(age, timedelta(minutes=1)) if since is None
                                        else since))


def launching(*, past_deadline: bool = False, region: str = "us-east-1",
              age: timedelta = timedelta(minutes=2)) -> NodeView:
    deadline = NOW - timedelta(seconds=1) if past_deadline else NOW + timedelta(minutes=10)
    return node(S.LAUNCHING, deadline=deadline, region=region, age=age)


ACTIVATION = timedelta(minutes=20)


def situation(*, unhealthy_since: dict[uuid.UUID, datetime] | None = None,
              terminating: frozenset[uuid.UUID] = frozenset(),
              cooling: frozenset[tuple[str, bool]] = frozenset()) -> Situation:
    return Situation(now=NOW, unhealthy_grace=GRACE, unhealthy_since=unhealthy_since or {},
                     terminating=terminating, cooling=cooling, activation_deadline=ACTIVATION)


def plan(nodes: list[NodeView], desired: int, d: DeploymentSpec | None = None,
         s: Situation | None = None) -> Plan:
    return plan_deployment(d or dep(), nodes, desired, s or situation())


def unhealthy_for(n: NodeView, how_long: timedelta) -> Situation:
    return situation(unhealthy_since={n.id: NOW - how_long})


def terminated_ids(p: Plan) -> list[uuid.UUID]:
    return [t.node_id for t in p.terminations]


def is_empty(p: Plan) -> bool:
    return not (p.launches or p.terminations or p.failures or p.waiting_for_capacity)


# ----------------------------------------------------------------- capacity


@pytest.mark.parametrize("make", [
    lambda: launching(),
    lambda: node(S.LAUNCHING, deadline=None),
    lambda: node(S.REGISTERED),
    lambda: node(S.ACTIVE),
    lambda: node(S.UNHEALTHY),  # no unhealthy_since recorded yet: it just turned
], ids=["launching", "launching-no-deadline", "registered", "active", "unhealthy-fresh"])
def test_counts_as_capacity(make: Callable[[], NodeView]) -> None:
    n = make()
    assert is_empty(plan([n], 1))
    p = plan([n], 2)
    assert len(p.launches) == 1
    assert p.launches[0].replaces is None
    assert p.launches[0].reason.startswith("below desired")
    assert not p.terminations and not p.failures


def test_unhealthy_within_grace_is_capacity() -> None:
    n = node(S.UNHEALTHY)
    s = unhealthy_for(n, GRACE - timedelta(seconds=1))
    assert is_empty(plan_deployment(dep(), [n], 1, s))


def test_all_capacity_kinds_together_meet_desired() -> None:
    sick = node(S.UNHEALTHY)
    nodes = [launching(), node(S.REGISTERED), node(S.ACTIVE), sick]
    s = unhealthy_for(sick, timedelta(minutes=1))
    assert is_empty(plan_deployment(dep(), nodes, 4, s))


def test_no_nodes_and_nothing_desired_is_a_no_op() -> None:
    assert is_empty(plan([], 0))


# ----------------------------------------------------------------- launch deadline


def test_launch_past_its_deadline_fails_and_is_replaced() -> None:
    late = launching(past_deadline=True)
    p = plan([late], 1)
    assert p.failures == [Fail(late.id, p.failures[0].reason)]
    assert "deadline" in p.failures[0].reason
    assert p.launches == [Launch(EAST, True, "replacement", replaces=late.id)]
    # ... and what the cloud half-made goes, without a drain (no agent to talk to).
    assert [(t.node_id, t.drain) for t in p.terminations] == [(late.id, False)]


def test_deadline_is_reached_at_the_exact_instant() -> None:
    late = node(S.LAUNCHING, deadline=NOW)
    p = plan([late], 1)
    assert [f.node_id for f in p.failures] == [late.id]


def test_an_active_node_has_no_deadline() -> None:
    # A node that became active after its launch deadline passed is fine, however long ago.
    n = node(S.ACTIVE, deadline=NOW - timedelta(hours=1), since=timedelta(days=3))
    assert is_empty(plan([n], 1))


def test_a_registered_node_has_its_launch_deadline_no_more() -> None:
    # It registered in time: the launch deadline is behind it, the activation one is not yet.
    n = node(S.REGISTERED, deadline=NOW - timedelta(minutes=1), since=timedelta(minutes=5))
    assert is_empty(plan([n], 1))


def test_a_node_registered_but_never_active_fails_at_its_activation_deadline() -> None:
    stuck = node(S.REGISTERED, since=ACTIVATION)
    p = plan([stuck], 1)
    assert [f.node_id for f in p.failures] == [stuck.id]
    assert "did not become active" in p.failures[0].reason
    # ... is replaced at once, and goes without a drain (it never served).
    assert p.launches == [Launch(EAST, True, "replacement", replaces=stuck.id)]
    assert [(t.node_id, t.drain) for t in p.terminations] == [(stuck.id, False)]


def test_a_registered_node_within_its_activation_deadline_is_capacity() -> None:
    n = node(S.REGISTERED, since=ACTIVATION - timedelta(seconds=1))
    assert is_empty(plan([n], 1))


def test_a_stuck_registered_node_no_longer_blocks_a_scale_up() -> None:
    # Scaling up waits for nodes on their way; a stuck one is not on its way any more.
    stuck = node(S.REGISTERED, since=ACTIVATION + timedelta(hours=1))
    p = plan([node(S.ACTIVE), stuck], 2)
    assert len(p.launches) == 1 and p.launches[0].replaces == stuck.id


def test_registration_time_unknown_means_no_activation_deadline() -> None:
    n = node(S.REGISTERED)
    n = NodeView(**{**n.__dict__, "status_since": None})
    assert is_empty(plan([n], 1))


# ----------------------------------------------------------------- lost nodes


@pytest.mark.parametrize(("status", "drain"), [
    (S.STALE, False),
    (S.FAILED, False),
    (S.DRAINING, True),  # draining without us asking: a spot notice
])
def test_lost_node_is_replaced_and_terminated(status: S, drain: bool) -> None:
    lost = node(status)
    p = plan([lost], 1)
    assert len(p.launches) == 1
    assert p.launches[0].replaces == lost.id
    assert p.launches[0].reason == "replacement"
    assert len(p.terminations) == 1
    t = p.terminations[0]
    assert (t.node_id, t.drain) == (lost.id, drain)
    assert t.reason.startswith("lost")
    assert not p.failures


def test_unhealthy_past_grace_is_lost() -> None:
    sick = node(S.UNHEALTHY)
    p = plan_deployment(dep(), [sick], 1, unhealthy_for(sick, GRACE + timedelta(seconds=1)))
    assert [lc.replaces for lc in p.launches] == [sick.id]
    assert [(t.node_id, t.drain) for t in p.terminations] == [(sick.id, True)]
    assert "grace" in p.terminations[0].reason


def test_unhealthy_grace_ends_at_the_exact_instant() -> None:
    sick = node(S.UNHEALTHY)
    p = plan_deployment(dep(), [sick], 1, unhealthy_for(sick, GRACE))
    assert terminated_ids(p) == [sick.id]
    assert [lc.replaces for lc in p.launches] == [sick.id]


def test_replacements_are_attributed_to_distinct_lost_nodes() -> None:
    a, b = node(S.STALE), node(S.DRAINING)
    p = plan([node(S.ACTIVE), a, b], 4)
    # Three launches: one for each lost node, then one because desired went up.
    assert [lc.replaces for lc in p.launches] == [a.id, b.id, None]
    assert [lc.reason for lc in p.launches][:2] == ["replacement", "replacement"]
    assert p.launches[2].reason.startswith("below desired")
    assert sorted(terminated_ids(p)) == sorted([a.id, b.id])


def test_lost_node_not_replaced_when_capacity_already_suffices() -> None:
    lost = node(S.STALE)
    p = plan([node(S.ACTIVE), node(S.ACTIVE), lost], 2)
    assert p.launches == []
    assert terminated_ids(p) == [lost.id]


def test_lost_node_replaced_only_up_to_the_shortfall() -> None:
    a, b = node(S.STALE), node(S.FAILED)
    p = plan([node(S.ACTIVE), a, b], 2)
    assert [lc.replaces for lc in p.launches] == [a.id]
    assert sorted(terminated_ids(p)) == sorted([a.id, b.id])


# ----------------------------------------------------------------- termination requested


@pytest.mark.parametrize(("status", "drain"), [
    (S.ACTIVE, True),
    (S.REGISTERED, True),
    (S.UNHEALTHY, True),
    (S.DRAINING, True),
    (S.LAUNCHING, False),
    (S.STALE, False),
    (S.FAILED, False),
])
def test_requested_termination_is_carried_out_and_not_capacity(status: S, drain: bool) -> None:
    going = node(status, terminate_requested=NOW - timedelta(seconds=30))
    p = plan([going], 1)
    assert p.terminations == [Terminate(going.id, "termination requested", drain)]
    # Not capacity, and not lost either: a plain launch, not attributed to it.
    assert len(p.launches) == 1
    assert p.launches[0].replaces is None
    assert not p.failures


def test_requested_termination_wins_over_a_passed_deadline() -> None:
    going = node(S.LAUNCHING, deadline=NOW - timedelta(minutes=1),
                 terminate_requested=NOW - timedelta(minutes=2))
    p = plan([going], 0)
    assert p.failures == []
    assert p.terminations == [Terminate(going.id, "termination requested", False)]


# ----------------------------------------------------------------- ignored nodes


@pytest.mark.parametrize("make", [
    lambda: node(S.ACTIVE),
    lambda: node(S.STALE),
    lambda: node(S.DRAINING),
    lambda: launching(past_deadline=True),
    lambda: node(S.ACTIVE, terminate_requested=NOW),
], ids=["active", "stale", "draining", "late-launch", "terminate-requested"])
def test_nodes_being_terminated_are_left_alone(make: Callable[[], NodeView]) -> None:
    n = make()
    p = plan([n], 1, s=situation(terminating=frozenset({n.id})))
    assert n.id not in terminated_ids(p)
    assert p.failures == []
    # Not capacity either, and not replaced a second time.
    assert [(lc.replaces, lc.reason.startswith("below desired")) for lc in p.launches] == [
        (None, True)]


def test_lost_node_replaced_last_tick_is_not_replaced_again() -> None:
    lost = node(S.STALE)
    replacement = launching()
    p = plan([lost, replacement], 1, s=situation(terminating=frozenset({lost.id})))
    assert is_empty(p)


def test_terminated_nodes_are_ignored() -> None:
    gone = node(S.TERMINATED, terminate_requested=NOW - timedelta(hours=1))
    assert is_empty(plan([gone], 0))
    p = plan([gone], 1)
    assert terminated_ids(p) == []
    assert [lc.replaces for lc in p.launches] == [None]


# ----------------------------------------------------------------- surplus


def test_surplus_goes_launching_first_then_unhealthy_then_newest() -> None:
    oldest = node(S.ACTIVE, age=timedelta(hours=10))
    older = node(S.ACTIVE, age=timedelta(hours=5))
    newest = node(S.ACTIVE, age=timedelta(minutes=10))
    sick = node(S.UNHEALTHY, age=timedelta(hours=20))
    fresh = launching(age=timedelta(minutes=1))
    nodes = [oldest, sick, newest, fresh, older]
    s = unhealthy_for(sick, timedelta(minutes=1))
    for keep, expected in [
        (4, [fresh]),
        (3, [fresh, sick]),
        (2, [fresh, sick, newest]),
        (1, [fresh, sick, newest, older]),
    ]:
        p = plan_deployment(dep(), nodes, keep, s)
        assert terminated_ids(p) == [n.id for n in expected], keep
        assert p.launches == []
        assert all(t.reason == "scale down" for t in p.terminations)


def test_surplus_launches_go_newest_first() -> None:
    a = launching(age=timedelta(minutes=3))
    b = launching(age=timedelta(minutes=1))
    c = launching(age=timedelta(minutes=2))
    p = plan([a, b, c], 1)
    assert terminated_ids(p) == [b.id, c.id]


def test_surplus_drains_nodes_that_can_talk() -> None:
    sick = node(S.UNHEALTHY)
    fresh = launching()
    p = plan_deployment(dep(), [fresh, sick, node(S.ACTIVE)], 1,
                        unhealthy_for(sick, timedelta(minutes=1)))
    assert [(t.node_id, t.drain) for t in p.terminations] == [(fresh.id, False), (sick.id, True)]


def test_registered_not_yet_serving_goes_before_active() -> None:
    # A registered node serves no traffic yet; it goes before an active one even if older.
    registered = node(S.REGISTERED, age=timedelta(hours=2))
    active = node(S.ACTIVE, age=timedelta(minutes=5))
    assert terminated_ids(plan([active, registered], 1)) == [registered.id]


def test_surplus_ignores_lost_nodes_but_terminates_them() -> None:
    lost = node(S.STALE)
    newest = node(S.ACTIVE, age=timedelta(minutes=1))
    p = plan([node(S.ACTIVE), newest, lost], 1)
    assert p.launches == []
    assert sorted(terminated_ids(p)) == sorted([lost.id, newest.id])


# ----------------------------------------------------------------- desired is clamped


def test_desired_above_max_is_clamped() -> None:
    p = plan([], 100, dep(max_nodes=3))
    assert len(p.launches) == 3


def test_desired_below_min_is_clamped() -> None:
    p = plan([], 0, dep(min_nodes=2))
    assert len(p.launches) == 2
    assert is_empty(plan([node(), node()], 0, dep(min_nodes=2)))


def test_lowered_max_scales_down() -> None:
    nodes = [node(age=timedelta(hours=i + 1)) for i in range(4)]
    p = plan(nodes, 4, dep(max_nodes=2))
    assert terminated_ids(p) == [nodes[0].id, nodes[1].id]  # the two newest


# ----------------------------------------------------------------- regions


@pytest.mark.parametrize(("value", "expected"), [
    ("aws/us-east-1", "us-east-1"),
    ("gcp/us-central1", "us-central1"),
    ("azure/eastus", "eastus"),
    ("us-east-1", "us-east-1"),
])
def test_bare_region(value: str, expected: str) -> None:
    assert bare_region(value) == expected


def test_launch_goes_to_least_loaded_region() -> None:
    nodes = [node(region="us-east-1"), node(region="us-east-1"), node(region="us-west-2")]
    p = plan(nodes, 4)
    assert [(lc.region, lc.spot) for lc in p.launches] == [(WEST, True)]


def test_node_regions_are_matched_without_their_cloud() -> None:
    # The east node counts against "aws/us-east-1": otherwise the tie would pick east.
    p = plan([node(region="us-east-1")], 2)
    assert [lc.region for lc in p.launches] == [WEST]


def test_ties_follow_the_deployments_region_order() -> None:
    assert [lc.region for lc in plan([], 1, dep(regions=(WEST, EAST))).launches] == [WEST]
    assert [lc.region for lc in plan([], 1, dep(regions=(EAST, WEST))).launches] == [EAST]


def test_several_launches_spread_across_regions() -> None:
    p = plan([], 6, dep(regions=(EAST, WEST, CENTRAL)))
    assert [lc.region for lc in p.launches] == [EAST, WEST, CENTRAL] * 2


def test_spreading_evens_out_an_uneven_fleet() -> None:
    nodes = [*(node(region="us-east-1") for _ in range(3)), node(region="us-west-2")]
    p = plan(nodes, 8, dep(regions=(EAST, WEST, CENTRAL)))
    regions = Counter(lc.region for lc in p.launches)
    # 8 nodes across 3 regions: 3 east (already), 3 west, 2 central.
    assert regions == {WEST: 2, CENTRAL: 2}


def test_nodes_outside_the_deployments_regions_count_as_capacity_only() -> None:
    p = plan([node(region="eu-west-1"), node(region="us-east-1")], 3)
    assert [lc.region for lc in p.launches] == [WEST]


def test_replacement_goes_where_the_lost_node_left_a_hole() -> None:
    lost = node(S.STALE, region="us-west-2")
    p = plan([node(region="us-east-1"), lost], 2)
    assert [(lc.region, lc.replaces) for lc in p.launches] == [(WEST, lost.id)]


# ----------------------------------------------------------------- capacity errors, spot


def test_cooling_region_is_skipped() -> None:
    p = plan([], 1, s=situation(cooling=frozenset({(EAST, True)})))
    assert [(lc.region, lc.spot) for lc in p.launches] == [(WEST, True)]


def test_cooling_region_is_skipped_even_when_least_loaded() -> None:
    nodes = [node(region="us-west-2") for _ in range(2)]
    p = plan(nodes, 4, s=situation(cooling=frozenset({(EAST, True)})))
    assert [(lc.region, lc.spot) for lc in p.launches] == [(WEST, True), (WEST, True)]


def test_cooling_is_per_spot_kind() -> None:
    # On-demand cooling in east says nothing about spot there.
    p = plan([], 1, s=situation(cooling=frozenset({(EAST, False)})))
    assert [(lc.region, lc.spot) for lc in p.launches] == [(EAST, True)]


def test_no_spot_anywhere_falls_back_to_on_demand() -> None:
    cooling = frozenset({(EAST, True), (WEST, True)})
    p = plan([node(region="us-east-1")], 2, s=situation(cooling=cooling))
    assert [(lc.region, lc.spot) for lc in p.launches] == [(WEST, False)]
    assert p.waiting_for_capacity is False


def test_on_demand_fallback_skips_cooling_on_demand_regions() -> None:
    cooling = frozenset({(EAST, True), (WEST, True), (EAST, False)})
    p = plan([], 2, s=situation(cooling=cooling))
    assert [(lc.region, lc.spot) for lc in p.launches] == [(WEST, False), (WEST, False)]


def test_no_spot_and_no_fallback_waits() -> None:
    cooling = frozenset({(EAST, True), (WEST, True)})
    lost = node(S.DRAINING)
    p = plan([lost], 1, dep(fallback=False), situation(cooling=cooling))
    assert p.launches == []
    assert p.waiting_for_capacity is True
    # The lost node still goes.
    assert terminated_ids(p) == [lost.id]


def test_nothing_open_anywhere_waits() -> None:
    cooling = frozenset({(r, spot) for r in (EAST, WEST) for spot in (True, False)})
    p = plan([], 2, s=situation(cooling=cooling))
    assert p.launches == []
    assert p.waiting_for_capacity is True


def test_not_waiting_when_nothing_is_needed() -> None:
    cooling = frozenset({(r, spot) for r in (EAST, WEST) for spot in (True, False)})
    p = plan([node()], 1, s=situation(cooling=cooling))
    assert is_empty(p)


def test_on_demand_deployment_never_launches_spot() -> None:
    p = plan([], 4, dep(spot=False))
    assert [lc.spot for lc in p.launches] == [False] * 4
    # Spot cooling is irrelevant to it...
    p = plan([], 1, dep(spot=False), situation(cooling=frozenset({(EAST, True)})))
    assert [(lc.region, lc.spot) for lc in p.launches] == [(EAST, False)]
    # ... and with on-demand cooling everywhere it waits rather than trying spot.
    cooling = frozenset({(EAST, False), (WEST, False)})
    p = plan([], 1, dep(spot=False, fallback=True), situation(cooling=cooling))
    assert p.launches == []
    assert p.waiting_for_capacity is True


def test_spot_deployment_launches_spot() -> None:
    p = plan([], 3)
    assert [(lc.region, lc.spot) for lc in p.launches] == [(EAST, True), (WEST, True), (EAST, True)]


# ----------------------------------------------------------------- suspect losses, a few at a time


def capped(fraction: float, **kw: object) -> Situation:
    return Situation(now=NOW, unhealthy_grace=GRACE, replace_at_once=fraction,
                     **kw)  # type: ignore[arg-type]


def test_a_fleet_gone_silent_at_once_is_replaced_a_few_at_a_time() -> None:
    # The whole fleet stale (the monitor's blindness, or a real mass loss): a quarter at once.
    stale = [node(S.STALE, age=timedelta(hours=8 - i)) for i in range(8)]
    p = plan_deployment(dep(min_nodes=8, max_nodes=8), stale, 8, capped(0.25))
    oldest_two = [n.id for n in stale[:2]]
    assert sorted(terminated_ids(p)) == sorted(oldest_two)
    assert sorted(lc.replaces for lc in p.launches) == sorted(oldest_two)  # type: ignore[type-var]
    assert p.held == [n.id for n in stale[2:]]
    # Held nodes are neither terminated nor replaced by "below desired" launches.
    assert len(p.launches) == 2


def test_no_more_suspect_replacements_while_earlier_ones_are_under_way() -> None:
    stale = [node(S.STALE) for _ in range(6)]
    replacements = [launching(), node(S.REGISTERED)]
    p = plan_deployment(dep(min_nodes=8, max_nodes=8), [*stale, *replacements], 8, capped(0.25))
    assert p.launches == [] and terminated_ids(p) == []
    assert sorted(p.held) == sorted(n.id for n in stale)


def test_suspects_being_terminated_count_as_under_way() -> None:
    going = node(S.STALE)
    rest = [node(S.STALE) for _ in range(3)]
    s = capped(0.5, terminating=frozenset({going.id}))
    # Its replacement is on its way: with a budget of two, nothing more until one is done.
    p = plan_deployment(dep(min_nodes=4, max_nodes=4), [going, launching(), *rest], 4, s)
    assert p.launches == [] and terminated_ids(p) == []
    assert sorted(p.held) == sorted(n.id for n in rest)


def test_one_suspect_at_a_time_even_for_a_small_deployment() -> None:
    a, b = node(S.STALE, age=timedelta(hours=2)), node(S.STALE, age=timedelta(hours=1))
    p = plan_deployment(dep(min_nodes=2, max_nodes=2), [a, b], 2, capped(0.25))
    assert terminated_ids(p) == [a.id]
    assert [lc.replaces for lc in p.launches] == [a.id]
    assert p.held == [b.id]


def test_unhealthy_past_grace_is_a_suspect_too() -> None:
    sick = [node(S.UNHEALTHY) for _ in range(4)]
    s = capped(0.25, unhealthy_since={n.id: NOW - GRACE * 2 for n in sick})
    p = plan_deployment(dep(min_nodes=4, max_nodes=4), sick, 4, s)
    assert len(terminated_ids(p)) == 1 and len(p.held) == 3


@pytest.mark.parametrize("status", [S.FAILED, S.DRAINING])
def test_confirmed_losses_are_replaced_at_once_whatever_the_cap(status: S) -> None:
    # The cloud says the machine is gone, or the node said it is leaving: no doubt to wait on.
    lost = [node(status) for _ in range(4)]
    p = plan_deployment(dep(min_nodes=4, max_nodes=4), lost, 4, capped(0.25))
    assert sorted(terminated_ids(p)) == sorted(n.id for n in lost)
    assert len(p.launches) == 4 and p.held == []


def test_a_held_node_that_comes_back_is_capacity_again() -> None:
    back = node(S.ACTIVE)
    p = plan_deployment(dep(min_nodes=2, max_nodes=2), [back, launching()], 2, capped(0.25))
    assert is_empty(p)


@pytest.mark.parametrize(("target", "fraction", "in_progress", "budget"), [
    (8, 0.25, 0, 2), (8, 0.25, 1, 1), (8, 0.25, 2, 0), (8, 0.25, 5, 0),
    (2, 0.25, 0, 1), (1, 0.25, 0, 1), (0, 0.25, 0, 1), (100, 0.1, 3, 7), (4, 1.0, 0, 4),
])
def test_replacement_budget(target: int, fraction: float, in_progress: int,
                            budget: int) -> None:
    assert replacement_budget(target, fraction, in_progress) == budget
