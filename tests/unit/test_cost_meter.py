"""The cost meter's pure rules: its unit, an hour's units, its Stripe price, which meters an hour
is billed on, and when a tenant's switch to the cost price may take effect."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.billing.hours import TOO_LARGE, HourDue, Plan, Skip, decide, meter_total
from services.domain.cost_meter import (
    COST_METERS,
    EPOCH,
    LAST_HOUR,
    TOKEN_METERS,
    fits_stripe,
    meters_for,
    parse_unit,
    switch_hour,
    to_units,
    unit_amount_decimal,
)
from services.domain.stripe_pricing import CostPriceSpec, SetupConflict, check_meter, check_price

NANO = Decimal("0.000000001")
MICRO = Decimal("0.000001")
T = uuid.UUID("0193a1b2-0000-7000-8000-0000000000aa")
H = datetime(2026, 3, 10, 14, tzinfo=UTC)


@pytest.mark.parametrize(("text", "unit", "cents"), [
    ("0.000000001", NANO, "0.0000001"),
    ("1e-9", NANO, "0.0000001"),
    ("0.000001", MICRO, "0.0001"),
    ("0.0010", Decimal("0.001"), "0.1"),
    ("0.01", Decimal("0.01"), "1"),
])
def test_a_unit_is_a_power_of_ten_and_its_price_is_in_cents(text: str, unit: Decimal,
                                                            cents: str) -> None:
    assert parse_unit(text) == unit
    assert unit_amount_decimal(parse_unit(text)) == cents
    assert "E" not in unit_amount_decimal(parse_unit(text))  # Stripe wants a plain decimal


@pytest.mark.parametrize("text", ["0", "-0.001", "0.002", "0.1", "1", "0.0000000001", "x", "",
                                  "NaN", "Infinity"])
def test_other_units_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"decimal|power of ten"):
        parse_unit(text)


def test_nano_units_are_exact_for_every_record_cost() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        cost = Decimal(rng.randrange(0, 10**15)).scaleb(-9)  # what a record holds: 9 places
        assert to_units(cost, NANO) * NANO == cost


def test_coarser_units_round_half_to_even_and_never_go_down() -> None:
    assert to_units(Decimal("0.0000025"), MICRO) == 2
    assert to_units(Decimal("0.0000035"), MICRO) == 4
    assert to_units(Decimal("0.000002500000001"), MICRO) == 3
    costs = sorted(Decimal(random.Random(3).randrange(0, 10**9)).scaleb(-9)
                   for _ in range(500))
    units = [to_units(c, MICRO) for c in costs]
    assert units == sorted(units)  # late usage never makes a negative correction
    assert all(abs(u * MICRO - c) <= MICRO / 2 for u, c in zip(units, costs, strict=True))


def test_stripe_takes_at_most_fifteen_digits() -> None:
    assert fits_stripe(10**15 - 1)
    assert not fits_stripe(10**15)
    assert not fits_stripe(-1)


def test_an_hour_is_on_the_token_meters_or_the_cost_meter_never_both() -> None:
    assert meters_for(H, None) == TOKEN_METERS
    assert meters_for(H, H + timedelta(hours=1)) == TOKEN_METERS
    assert meters_for(H, H) == COST_METERS
    assert meters_for(H, EPOCH) == COST_METERS


def test_a_switch_is_at_the_next_hour_after_token_billing_at_the_earliest() -> None:
    now = datetime(2026, 3, 10, 14, 20, tzinfo=UTC)
    assert switch_hour(now, None) == EPOCH  # never billed by tokens: by cost from the start
    assert switch_hour(now, H - timedelta(hours=3)) == H + timedelta(hours=1)
    # a token hour planned later than now's hour (clocks apart): still after it
    assert switch_hour(now, H + timedelta(hours=2)) == H + timedelta(hours=3)
    later = datetime(2026, 4, 1, tzinfo=UTC)
    assert switch_hour(now, H, later) == later
    # A requested time: the whole hour at or after it, never before the earliest allowed.
    assert switch_hour(now, None, later + timedelta(minutes=30)) == later + timedelta(hours=1)
    assert switch_hour(now, H - timedelta(hours=3), H) == H + timedelta(hours=1)
    assert switch_hour(now, None, datetime(125, 3, 26, 12, 23, tzinfo=UTC)) == EPOCH
    assert switch_hour(now, None, datetime(9999, 12, 31, 23, 30, tzinfo=UTC)) == LAST_HOUR


def test_cost_totals_become_whole_units_and_tokens_stay_tokens() -> None:
    assert meter_total("cost", Decimal("1.234567891"), NANO) == 1_234_567_891
    assert meter_total("cost", Decimal("1.2345675"), MICRO) == 1_234_568
    assert meter_total("input_tokens", Decimal(1234), NANO) == 1234


def test_a_value_stripe_would_refuse_is_skipped_for_an_operator_once() -> None:
    huge = HourDue(T, H, "cost", 10**15, 0, None, False, "cus_1")
    fine = HourDue(T, H, "cost", 10**15 - 1, 0, None, False, "cus_1")
    names = {"cost": "crosslogic_cost"}
    [skip] = decide([huge], names)
    assert isinstance(skip, Skip) and skip.reason == TOO_LARGE
    assert decide([HourDue(T, H, "cost", 10**15, 0, None, True, "cus_1")], names) == []
    [plan] = decide([fine], names)
    assert isinstance(plan, Plan) and plan.identifier == f"{T}:cost:2026-03-10T14"


SPEC = CostPriceSpec("crosslogic_cost", NANO, "usd")
METER = {"id": "mtr_1", "default_aggregation": {"formula": "sum"},
         "value_settings": {"event_payload_key": "value"},
         "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"}}
PRICE = {"id": "price_1", "currency": "usd", "unit_amount_decimal": "0.0000001",
         "recurring": {"usage_type": "metered", "meter": "mtr_1"}}


def test_setup_accepts_only_the_meter_and_price_billing_sends_to() -> None:
    check_meter(METER, SPEC)
    check_price(PRICE, SPEC, "mtr_1")
    check_price({**PRICE, "unit_amount_decimal": Decimal("1E-7")}, SPEC, "mtr_1")
    with pytest.raises(SetupConflict, match="aggregation"):
        check_meter({**METER, "default_aggregation": {"formula": "count"}}, SPEC)
    with pytest.raises(SetupConflict, match="unit amount"):
        check_price({**PRICE, "unit_amount_decimal": "0.0001"}, SPEC, "mtr_1")
    with pytest.raises(SetupConflict, match="currency"):
        check_price({**PRICE, "currency": "eur"}, SPEC, "mtr_1")
    with pytest.raises(SetupConflict, match="metered"):
        check_price(PRICE, SPEC, "mtr_2")
