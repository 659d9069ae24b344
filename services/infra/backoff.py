"""Exponential backoff with jitter, for anything that retries an unreachable dependency."""

from __future__ import annotations

import random


class Backoff:
    """`next()` gives initial, initial·factor, … capped at `maximum`, each ±`jitter`
    (a fraction) so replicas that failed together do not retry together."""

    def __init__(self, initial: float = 0.2, maximum: float = 10.0, factor: float = 2.0,
                 jitter: float = 0.2, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("bad backoff parameters")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._current = initial

    def next(self) -> float:
        base = self._current
        self._current = min(self.maximum, self._current * self.factor)
        spread = base * self.jitter
        return base + self._rng.uniform(-spread, spread)

    def reset(self) -> None:
        self._current = self.initial
