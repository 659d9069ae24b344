"""Cost arithmetic: Decimal, per million tokens, rounded once (pure)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.domain.pricing import cost, parse_multipliers

D = Decimal


@pytest.mark.parametrize(("prompt", "completion", "inp", "out", "mult", "expected"), [
    (0, 0, D("0.10"), D("0.20"), D(1), D("0E-9")),
    (1_000_000, 0, D("0.10"), D("0.20"), D(1), D("0.100000000")),
    (0, 1_000_000, D("0.10"), D("0.20"), D(1), D("0.200000000")),
    (123, 456, D("0.15"), D("0.60"), D(1), D("0.000292050")),
    (123, 456, D("0.15"), D("0.60"), D("1.10"), D("0.000321255")),
    (1, 0, D("0.0000015"), D(0), D(1), D("0E-9")),         # 1.5e-12: rounds to 0
    (1, 0, D("0.0005"), D(0), D(1), D("0E-9")),            # exactly half a nanodollar: even
    (3, 0, D("0.0005"), D(0), D(1), D("2E-9")),            # 1.5e-9 -> 2e-9 (half to even)
    (10**12, 10**12, D("2.5"), D("10"), D(1), D("12500000.000000000")),  # huge, exact
    # The largest token counts a request can carry, at the catalog's extreme prices: exact.
    (2**31 - 1, 2**31 - 1, D("999999.999999"), D("0.000001"), D("1.25"),
     D("2684354558.750000000")),
    (7, 3, D("0.000001"), D("0.000001"), D("1.5"), D("0E-9")),  # 1.5e-11: rounds to 0
    (999_999, 1, D("0.15"), D("0.60"), D(0), D("0E-9")),  # a free region
    (5, 0, D("0.0003"), D(0), D("1.000000"), D("2E-9")),  # 1.5e-9: half to even, up
    (7, 0, D("0.0005"), D(0), D(1), D("4E-9")),  # 3.5e-9: half to even, up to 4
    (9, 0, D("0.0005"), D(0), D(1), D("4E-9")),  # 4.5e-9: half to even, down to 4
])
def test_cost(prompt: int, completion: int, inp: Decimal, out: Decimal, mult: Decimal,
              expected: Decimal) -> None:
    got = cost(prompt, completion, inp, out, mult)
    assert got == expected
    assert got.as_tuple().exponent == -9  # always nanodollars


def test_cost_is_additive_within_rounding() -> None:
    one = cost(1000, 2000, D("0.10"), D("0.30"))
    assert cost(2000, 4000, D("0.10"), D("0.30")) == 2 * one


def test_negative_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        cost(-1, 0, D(1), D(1))
    with pytest.raises(ValueError, match="negative"):
        cost(1, 0, D(-1), D(1))


def test_parse_multipliers() -> None:
    assert parse_multipliers("") == {}
    assert parse_multipliers(" eu-west-1=1.10, ap-south-1 = 1.25 ,") == {
        "eu-west-1": D("1.10"), "ap-south-1": D("1.25")}
    for bad in ("eu-west-1", "=1.1", "x=abc", "x=-1", "x=nan", "x=inf"):
        with pytest.raises(ValueError, match="bad region multiplier"):
            parse_multipliers(bad)
