"""Projection `event_type_stats`: events per type, for operators (`crosslogic events stats`)
and for the relay/projection lag panels. Also the smallest real example of a projection."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from services.infra.db import Connection
from services.infra.log_records import RecordedEvent
from services.infra.projections import Projection


class EventTypeStats(Projection):
    name = "event_type_stats"
    tables = ("event_type_stats",)

    async def apply(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        counts = Counter(e.type for e in events)
        latest = {e.type: e for e in events}
        types = sorted(counts)
        await conn.execute(
            """INSERT INTO event_type_stats (type, events, last_position, last_recorded_at)
               SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[])
               ON CONFLICT (type) DO UPDATE SET
                   events = event_type_stats.events + EXCLUDED.events,
                   last_position = EXCLUDED.last_position,
                   last_recorded_at = EXCLUDED.last_recorded_at""",
            types, [counts[t] for t in types], [latest[t].position for t in types],
            [latest[t].recorded_at for t in types])
