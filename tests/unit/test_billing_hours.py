"""Which hours are closed, what is pushed to Stripe, under which identifier and timestamp
(pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.billing.hours import (
    NO_CUSTOMER,
    HourDue,
    Plan,
    Skip,
    closed_before,
    decide,
    floor_hour,
    identifier,
    is_closed,
    meter_timestamp,
    must_hold,
    send_groups,
)

T = uuid.UUID("0193a1b2-0000-7000-8000-0000000000aa")
U = uuid.UUID("0193a1b2-0000-7000-8000-0000000000bb")
H = datetime(2026, 3, 10, 14, tzinfo=UTC)
NAMES = {"input_tokens": "in_tokens", "output_tokens": "out_tokens"}


def at(h: int, m: int = 0, s: int = 0) -> datetime:
    return datetime(2026, 3, 10, h, m, s, tzinfo=UTC)


def test_floor_hour_is_utc_and_needs_a_zone() -> None:
    paris = timezone(timedelta(hours=1))
    assert floor_hour(datetime(2026, 3, 10, 15, 59, 59, 999999, tzinfo=paris)) == H
    with pytest.raises(ValueError, match="time zone"):
        floor_hour(datetime(2026, 3, 10, 14))


@pytest.mark.parametrize(("now", "grace_s", "closed"), [
    (at(15, 0, 0), 0, True),        # the hour ended, no grace: closed at once
    (at(14, 59, 59), 0, False),     # still running
    (at(15, 4, 59), 300, False),    # inside the grace
    (at(15, 5, 0), 300, True),      # the grace is over, to the second
    (at(17), 300, True),
])
def test_an_hour_closes_when_its_grace_is_over(now: datetime, grace_s: int,
                                               closed: bool) -> None:
    assert is_closed(H, now, timedelta(seconds=grace_s)) is closed
    assert (closed_before(now, timedelta(seconds=grace_s)) > H) is closed


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        closed_before(at(15), timedelta(seconds=-1))


def test_identifiers_are_deterministic_and_short() -> None:
    first = identifier(T, "input_tokens", at(14, 37))
    assert first == f"{T}:input_tokens:2026-03-10T14"
    assert first == identifier(T, "input_tokens", H)  # any instant of the hour
    assert identifier(T, "input_tokens", H, 2) == first + ":2"
    assert identifier(T, "output_tokens", H) != first
    assert identifier(U, "input_tokens", H) != first
    assert len(identifier(T, "output_tokens", H, 99999)) <= 100  # Stripe's limit
    with pytest.raises(ValueError, match="negative"):
        identifier(T, "input_tokens", H, -1)


def test_meter_timestamp_is_the_hour_start_unless_stripe_would_refuse_it() -> None:
    now = at(16)
    long_window = timedelta(days=60)
    assert meter_timestamp(at(14, 30), now, long_window) == int(H.timestamp())
    recent_enough = now - timedelta(days=34)
    assert meter_timestamp(recent_enough, now, long_window) == int(
        floor_hour(recent_enough).timestamp())
    # Beyond Stripe's 35 days (less a margin), the usage is billed now, not lost.
    too_old = now - timedelta(days=35)
    assert meter_timestamp(too_old, now, long_window) == int(now.timestamp())
    assert meter_timestamp(now - timedelta(days=60), now, long_window) == int(now.timestamp())


@pytest.mark.parametrize(("sent_at", "stamped"), [
    (at(15, 5), at(14)),          # the usual push, 5 minutes after the hour: the hour's start
    (at(15, 45), at(14)),         # the window's last moment
    (at(15, 45, 1), at(15, 45, 1)),  # later: its period may be invoiced already, so now
    (at(19, 30), at(19, 30)),     # a correction hours later
])
def test_hours_sent_late_are_stamped_now(sent_at: datetime, stamped: datetime) -> None:
    """Stripe finalizes a period's invoice an hour after the period ends (by default): usage
    aimed at it after that is never billed. Past the window nothing is aimed at the past."""
    assert meter_timestamp(at(14, 30), sent_at) == int(stamped.timestamp())
    assert meter_timestamp(at(14), at(15, 1), timedelta(0)) == int(at(15, 1).timestamp())


def due(total: int, planned: int = 0, last: int | None = None, *, skipped: bool = False,
        customer: str | None = "cus_1", meter: str = "input_tokens",
        tenant: uuid.UUID = T) -> HourDue:
    return HourDue(tenant, H, meter, total, planned, last, skipped, customer)  # type: ignore[arg-type]


def test_a_closed_hour_is_planned_whole() -> None:
    [plan] = decide([due(1234)], NAMES)
    assert plan == Plan(T, H, "input_tokens", "in_tokens", 1234,
                        f"{T}:input_tokens:2026-03-10T14", 0, "cus_1")


def test_late_usage_is_a_correction_for_the_difference_only() -> None:
    [plan] = decide([due(1500, planned=1234, last=0)], NAMES)
    assert isinstance(plan, Plan)
    assert (plan.value, plan.sequence) == (266, 1)
    assert plan.identifier.endswith(":2026-03-10T14:1")
    [again] = decide([due(1600, planned=1500, last=1)], NAMES)
    assert isinstance(again, Plan)
    assert (again.value, again.sequence) == (100, 2)


def test_nothing_is_planned_when_all_is_planned_or_nothing_is_due() -> None:
    assert decide([due(10, planned=10, last=0), due(0), due(5, planned=9, last=0)], NAMES) == []


def test_a_tenant_without_customer_is_skipped_once_then_pushed_once_linked() -> None:
    [skip] = decide([due(700, customer=None)], NAMES)
    assert skip == Skip(T, H, "input_tokens", 700, f"{T}:input_tokens:2026-03-10T14", 0,
                        NO_CUSTOMER)
    assert decide([due(800, customer=None, skipped=True)], NAMES) == []  # reported already
    # Linked later: the same identifier the skip reported, for everything the hour holds.
    [plan] = decide([due(800, skipped=True)], NAMES)
    assert isinstance(plan, Plan)
    assert (plan.identifier, plan.value) == (skip.identifier, 800)


def test_a_meter_without_event_name_is_not_exported() -> None:
    assert decide([due(5, meter="output_tokens")], {"input_tokens": "in_tokens"}) == []


def test_send_groups_keep_one_call_per_customer_and_meter() -> None:
    def plan(customer: str, event: str, hour: int, seq: int = 0) -> Plan:
        when = at(hour)
        return Plan(T, when, "input_tokens", event, 1, identifier(T, event, when, seq), seq,
                    customer)

    plans = [plan("c1", "in", 3), plan("c2", "in", 1), plan("c1", "in", 1), plan("c1", "out", 2),
             plan("c1", "in", 1, 1)]
    groups = send_groups(plans)
    keys = [{(p.customer_id, p.event_name) for p in g} for g in groups]
    assert all(len(k) == 1 for k in keys)
    assert len(groups) == 3
    c1_in = next(g for g in groups if (g[0].customer_id, g[0].event_name) == ("c1", "in"))
    assert [(p.hour.hour, p.sequence) for p in c1_in] == [(1, 0), (1, 1), (3, 0)]


def test_a_plan_that_may_have_reached_stripe_is_held_past_the_horizon() -> None:
    horizon = timedelta(hours=20)
    planned = at(0)
    assert not must_hold(planned, planned + timedelta(hours=19, minutes=59), horizon, True)
    assert must_hold(planned, planned + horizon, horizon, True)
    assert must_hold(planned, planned + timedelta(days=3), horizon, True)
    # Every attempt refused before Stripe did anything (429, 401): resending stays safe.
    assert not must_hold(planned, planned + timedelta(days=3), horizon, False)
