"""Which models a batch makes billing ask the catalog about (services/billing/prices.py,
`to_look_up`): only those neither priced already nor found missing a moment ago."""

from __future__ import annotations

from services.billing.prices import to_look_up

KNOWN = {"llama-8b": object()}


def test_a_priced_model_is_never_asked_about() -> None:
    assert to_look_up(["llama-8b"], KNOWN, {}, now=100, unknown_seconds=5) == set()


def test_a_model_never_seen_is_asked_about_once_per_batch() -> None:
    batch = ["made-up", "made-up", "other", "llama-8b"]
    assert to_look_up(batch, KNOWN, {}, now=100, unknown_seconds=5) == {"made-up", "other"}


def test_a_model_found_missing_is_remembered_for_a_while() -> None:
    missing = {"made-up": 100.0}
    assert to_look_up(["made-up"], KNOWN, missing, now=100, unknown_seconds=5) == set()
    assert to_look_up(["made-up"], KNOWN, missing, now=104.9, unknown_seconds=5) == set()
    assert to_look_up(["made-up"], KNOWN, missing, now=105, unknown_seconds=5) == {"made-up"}


def test_without_a_memory_every_batch_asks_again() -> None:
    assert to_look_up(["made-up"], KNOWN, {"made-up": 100.0}, now=100,
                      unknown_seconds=0) == {"made-up"}


def test_an_empty_batch_asks_nothing() -> None:
    assert to_look_up([], KNOWN, {}, now=0, unknown_seconds=5) == set()
