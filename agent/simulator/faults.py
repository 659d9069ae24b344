"""The faults in force, changed through ``/admin/faults``, and the dice for ``error_rate``."""

from __future__ import annotations

import random
from typing import Any

from agent.simulator.config import Faults, merge_faults


class FaultState:
    def __init__(self, initial: Faults, seed: int) -> None:
        self.initial = initial
        self.current = initial
        # Seeded so a run with error_rate between 0 and 1 fails the same requests every time.
        self._dice = random.Random(seed)

    def update(self, patch: Any) -> Faults:
        """Merge a JSON object into the current faults; ConfigError when it does not fit."""
        self.current = merge_faults(self.current, patch)
        return self.current

    def reset(self) -> Faults:
        """Back to no faults at all (not to the ones given at start)."""
        self.current = Faults()
        return self.current

    def fails(self, faults: Faults) -> bool:
        """Whether this request gets the simulated 500."""
        rate = faults.error_rate
        return rate > 0 and (rate >= 1 or self._dice.random() < rate)

    @staticmethod
    def cut_after(faults: Faults) -> tuple[int | None, bool]:
        """After how many tokens the stream stops, and whether it is a drop (else a hang)."""
        hang, drop = faults.hang_after_tokens, faults.drop_after_tokens
        if drop is not None and (hang is None or drop <= hang):
            return drop, True
        return hang, False
