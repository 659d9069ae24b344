"""A gateway's concurrency slots under RATELIMIT_SLICES (ratelimit/slot_share.py)."""

from __future__ import annotations

from services.gateway.ratelimit.share import IDLE_SECONDS
from services.gateway.ratelimit.slot_share import HEADROOM, SlotShare


def test_a_request_holds_a_slot_until_it_ends() -> None:
    slots = SlotShare()
    assert not slots.take(0.0)
    assert slots.want(limit=100) == 2  # one and a little headroom
    slots.granted(["a:1", "a:2"], valid_until=120.0, ungranted=98)
    assert slots.take(0.0) and slots.take(0.0) and not slots.take(0.0)
    slots.release()
    assert slots.take(1.0) and slots.in_use == 2


def test_near_the_limit_slots_come_one_at_a_time() -> None:
    slots = SlotShare()
    slots.granted([], valid_until=0.0, ungranted=5)
    assert slots.want(limit=1000) == 1
    busy = SlotShare(in_use=40)
    busy.granted([], valid_until=0.0, ungranted=10_000)
    assert busy.want(limit=10_000) == 1 + HEADROOM


def test_lapsed_slots_are_nobodys_and_idle_ones_go_back() -> None:
    slots = SlotShare()
    slots.granted(["a:1", "a:2", "a:3"], valid_until=120.0, ungranted=0)
    assert slots.take(1.0)
    assert slots.surplus(1.0 + IDLE_SECONDS / 2) == []  # still busy
    assert slots.surplus(1.0 + IDLE_SECONDS) == ["a:2", "a:3"]  # the one in use stays
    assert slots.held == ["a:1"]
    assert slots.surplus(1.0, everything=True) == ["a:1"]  # shutdown: all of them
    slots.granted(["b:1"], valid_until=130.0, ungranted=0)
    assert not slots.take(130.0)  # lapsed in Redis: maybe someone else's now
    assert slots.held == []
