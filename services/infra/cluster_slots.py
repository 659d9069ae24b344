"""Which Redis Cluster primary serves a key, from the cluster's own answers. Pure.

A key's slot is CRC16 of its hash tag (the part between the first `{` and the next `}`, when
not empty) or of the whole key, mod 16384; `CLUSTER SLOTS` says which primary holds each slot
range, and a `MOVED`/`ASK` error reply says where a slot went since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot as _crc_slot

SLOTS = 16_384


def key_slot(key: str | bytes) -> int:
    return int(_crc_slot(key.encode() if isinstance(key, str) else key))


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Redirect:
    """A `MOVED` (the slot lives elsewhere now: ask there from now on) or `ASK` (the slot is
    migrating: ask there this once, after `ASKING`)."""

    moved: bool
    slot: int
    to: Address


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_address(text: str, *, default_host: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host or default_host, int(port))


def redirect(message: str, *, default_host: str) -> Redirect | None:
    """The redirect an error reply carries ("MOVED 3999 127.0.0.1:6381"), or None."""
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    try:
        return Redirect(parts[0] == "MOVED", int(parts[1]),
                        parse_address(parts[2], default_host=default_host))
    except ValueError:
        return None


class SlotMap:
    """Slot → primary, as one node told it (`CLUSTER SLOTS`)."""

    __slots__ = ("_owners", "primaries")

    def __init__(self, owners: Sequence[Address | None]) -> None:
        if len(owners) != SLOTS:
            raise ValueError(f"a slot map has {SLOTS} entries, not {len(owners)}")
        self._owners = list(owners)
        self.primaries: tuple[Address, ...] = tuple(
            sorted({a for a in owners if a is not None}, key=str))

    @classmethod
    def from_cluster_slots(cls, reply: Any, *, asked: Address) -> SlotMap:
        """From `CLUSTER SLOTS`' reply: [[start, end, [host, port, id, ...], replicas...]...].
        A node that reports no host (an empty one) means the host it was asked at."""
        owners: list[Address | None] = [None] * SLOTS
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = _text(primary[0]) or asked.host
            if not 0 <= start <= end < SLOTS:
                raise ValueError(f"bad slot range {start}-{end}")
            address = Address(host, int(primary[1]))
            owners[start:end + 1] = [address] * (end - start + 1)
        return cls(owners)

    def node_for(self, slot: int) -> Address | None:
        return self._owners[slot]

    def covers_all(self) -> bool:
        return all(a is not None for a in self._owners)

    def moved(self, slot: int, to: Address) -> SlotMap:
        owners = list(self._owners)
        owners[slot] = to
        return SlotMap(owners)
