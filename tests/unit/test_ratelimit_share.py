"""A gateway's share of the platform-wide request limit: what it borrows, spends, lapses and
hands back (services/gateway/ratelimit/share.py)."""

from __future__ import annotations

from services.gateway.ratelimit.share import (
    FAIR_DIVISOR,
    HORIZON_SECONDS,
    IDLE_SECONDS,
    MIN_SLICE,
    Share,
)

WINDOW = 1_733_400_000_000


def test_a_quiet_gateway_borrows_a_few_requests_at_a_time() -> None:
    share = Share()
    assert not share.take(0.0)
    assert share.want(limit=100_000, waiting=1) == MIN_SLICE
    share.granted(MIN_SLICE, WINDOW, valid_until=60.0, ungranted=100_000 - MIN_SLICE)
    assert share.take(0.0) and share.left == MIN_SLICE - 1  # the borrowing request spends one
    # One request every few seconds: its rate stays near nothing, and so do its slices.
    for t in (5.0, 10.0, 15.0):
        share.take(t)
        assert share.want(limit=100_000, waiting=1) == MIN_SLICE
    # Under a small limit, a fair part of it: one request at a time.
    assert Share().want(limit=3, waiting=1) == 1


def test_a_busy_gateway_borrows_what_its_rate_spends_in_the_horizon() -> None:
    share = Share()
    for i in range(2000):  # 2,000 requests a second for a second
        share.take(i / 2000)
    rate = share.rate
    assert 1000 < rate < 2000  # decayed: the recent past weighs most
    want = share.want(limit=1_000_000, waiting=1)
    assert want == -(-rate * HORIZON_SECONDS // 1)
    # …but never more than a fair part of what is still ungranted platform-wide.
    share.granted(0, WINDOW, valid_until=60.0, ungranted=400)
    assert share.want(limit=1_000_000, waiting=1) == 400 // FAIR_DIVISOR
    share.granted(0, WINDOW, valid_until=60.0, ungranted=7)
    assert share.want(limit=1_000_000, waiting=1) == 1  # near the limit: one at a time


def test_requests_waiting_together_are_borrowed_for_at_once() -> None:
    share = Share()
    assert share.want(limit=1000, waiting=32) == 32


def test_a_slice_is_spent_exactly_and_put_back_when_refused_elsewhere() -> None:
    share = Share()
    share.granted(3, WINDOW, valid_until=60.0, ungranted=10)
    assert [share.take(1.0) for _ in range(4)] == [True, True, True, False]
    share.put_back(1.0)
    assert share.take(1.0) and not share.take(1.0)
    assert share.remaining() == 10


def test_a_slice_lapses_with_its_window_and_a_new_window_starts_clean() -> None:
    share = Share()
    share.granted(5, WINDOW, valid_until=60.0, ungranted=0)
    assert share.take(59.9)
    assert not share.take(60.0)  # the window ended: what was left is nobody's
    share.put_back(60.5)
    assert share.left == 0
    share.granted(2, WINDOW, valid_until=60.0, ungranted=0)
    share.granted(4, WINDOW + 60_000, valid_until=120.0, ungranted=96)
    assert share.left == 4  # an earlier window's holdings never carry over


def test_idle_holdings_go_back_and_lapsed_ones_are_not_given() -> None:
    share = Share()
    share.granted(10, WINDOW, valid_until=60.0, ungranted=0)
    assert share.take(1.0)
    assert share.idle_leftover(1.0 + IDLE_SECONDS / 2) == 0  # still busy
    assert share.idle_leftover(1.0 + IDLE_SECONDS) == 9
    assert share.left == 0 and share.idle_leftover(50.0) == 0
    share.granted(10, WINDOW, valid_until=60.0, ungranted=0)
    assert share.release(59.0) == 10
    share.granted(10, WINDOW, valid_until=60.0, ungranted=0)
    assert share.release(61.0) == 0 and share.left == 0


def test_a_share_of_tokens_takes_amounts_and_settles_back() -> None:
    share = Share()
    assert not share.take(0.0, 100)
    assert share.want(limit=100_000, waiting=100, need=100) == MIN_SLICE * 100
    share.granted(400, WINDOW, valid_until=60.0, ungranted=99_600)
    assert share.take(0.0, 100) and share.left == 300
    share.settle(0.5, WINDOW, 40 - 100)  # used 40 of the 100 reserved
    assert share.left == 360
    assert not share.take(0.5, 361) and share.take(0.5, 360)
    assert share.left == 0
    share.settle(61.0, WINDOW, -50)  # its window is over: dropped, as in Redis
    assert share.left == 0
    share.settle(1.0, WINDOW - 60_000, -50)  # another window's: dropped too
    assert share.left == 0


def test_a_debt_is_borrowed_for_and_handed_back_as_one() -> None:
    share = Share()
    share.granted(100, WINDOW, valid_until=60.0, ungranted=100_000)
    assert share.take(0.0, 100)
    share.settle(0.1, WINDOW, 250 - 100)  # used 250 of 100 reserved: 150 owed
    assert share.left == -150
    assert not share.take(0.2, 1)
    assert share.want(limit=1_000_000, waiting=100, need=100) >= 250  # the debt and a request
    assert share.remaining() == 100_000 - 150
    assert share.release(1.0) == -150  # handed back as a debt to record


def test_a_counter_takes_room_for_one_even_for_nothing() -> None:
    share = Share()
    share.granted(1, WINDOW, valid_until=60.0, ungranted=0)
    assert share.take(0.0, 0) and share.left == 1  # estimated 0 tokens: needs room, spends 0
    assert share.take(0.0, 1) and not share.take(0.0, 0)
