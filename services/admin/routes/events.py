"""The event log for operators: history as JSON pages, history-then-live as server-sent
events, and counts per type. Each event is the object `crosslogic events tail --json` prints
(services/infra/event_json.py)."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from services.admin.bodies import EventList, EventStats, EventTypeStat
from services.admin.context import ADMIN_SETTINGS, EVENT_STREAMS
from services.admin.routing import QueryParam, Route, add
from services.admin.web_io import db, json_response
from services.infra.errors import ApiError, sse_error_event
from services.infra.event_json import record_json
from services.infra.event_stats import EventTypeStats
from services.infra.eventlog import EventLog
from services.infra.http import REQUEST_ID, WAKER
from services.infra.log_records import RecordedEvent
from services.infra.projections import ProjectionRunner
from services.infra.request_checks import (
    DEFAULT_EVENT_LIMIT,
    GLOB_PATTERN,
    INT64_MAX,
    MAX_EVENT_LIMIT,
    POSITION_PATTERN,
    Integer,
    Text,
    TimeOrAgo,
    decode_position,
    encode_position,
    parse_event_query,
)

log = structlog.get_logger("admin.events")

_SCAN = 1000


async def list_events(request: web.Request) -> web.Response:
    query = parse_event_query(list(request.query.items()))
    eventlog = EventLog(db(request))
    found: list[RecordedEvent] = []
    after = query.after
    cursor: str | None = None
    # read_all's limit counts rows scanned, not matched: keep scanning until the page is full
    # or the readable end of the log is reached.
    while True:
        page = await eventlog.read_all(after, _SCAN, query.filter)
        room = query.limit - len(found)
        found.extend(page.events[:room])
        if len(page.events) >= room:
            cursor = encode_position(found[-1].checkpoint) if found else None
            break
        after = page.next
        if page.caught_up:
            break
    body = b'{"data":[' + b",".join(record_json(e) for e in found) + b'],"next_cursor":'
    body += (b'"' + cursor.encode() + b'"') if cursor else b"null"
    return web.Response(body=body + b"}", content_type="application/json")


def _sse(e: RecordedEvent) -> bytes:
    return b"id: " + encode_position(e.checkpoint).encode() + b"\ndata: " + record_json(e) + \
        b"\n\n"


async def stream_events(request: web.Request) -> web.StreamResponse:
    query = parse_event_query(list(request.query.items()), paged=False)
    after = query.after
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id:  # an EventSource reconnecting resumes where it was
        after = decode_position(last_event_id, "Last-Event-ID")
    app = request.app
    streams, waker = app[EVENT_STREAMS], app[WAKER]
    keepalive = app[ADMIN_SETTINGS].event_stream_keepalive
    eventlog = EventLog(db(request))
    loop = asyncio.get_running_loop()

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    streams.open += 1
    last_write = loop.time()
    try:
        while not streams.closing.is_set():
            generation = waker.generation
            page = await eventlog.read_all(after, _SCAN, query.filter)
            if page.events:
                await response.write(b"".join(_sse(e) for e in page.events))
                last_write = loop.time()
            after = page.next
            if not page.caught_up:
                continue
            if loop.time() - last_write >= keepalive:
                await response.write(b": keep-alive\n\n")
                last_write = loop.time()
            await waker.wait(generation, timeout=min(keepalive, waker.poll_interval))
    except ConnectionResetError:
        return response  # the client left
    except Exception:
        # The 200 is gone already: say so in the stream, as the gateway does.
        log.exception("event stream failed")
        try:
            await response.write(sse_error_event(ApiError.internal(request[REQUEST_ID])))
        except ConnectionResetError:
            return response
    finally:
        streams.open -= 1
    await response.write_eof()
    return response


async def event_stats(request: web.Request) -> web.Response:
    pool = db(request)
    # Bring the projection up to the end of the log first, so the figures are current.
    await ProjectionRunner(EventLog(pool), EventTypeStats()).catch_up()
    rows = await pool.fetch("SELECT type, events, last_position, last_recorded_at "
                            "FROM event_type_stats ORDER BY type")
    return json_response(EventStats(data=[
        EventTypeStat(type=r["type"], events=r["events"], last_position=r["last_position"],
                      last_recorded_at=r["last_recorded_at"]) for r in rows]))


FILTERS = (
    QueryParam("type", "event type or glob (`node.*`); repeat for several",
               Text(max_length=200, pattern=GLOB_PATTERN), repeatable=True),
    QueryParam("stream", "stream name or glob (`tenant:*`)",
               Text(max_length=200, pattern=GLOB_PATTERN)),
    QueryParam("since", "recorded since: `30s`, `10m`, `2h`, `7d` ago, or an ISO-8601 time",
               TimeOrAgo()),
    QueryParam("from", "from this log position on", Integer(0, INT64_MAX)),
    QueryParam("cursor", "resume after this place (`next_cursor`, or an SSE `id`)",
               Text(max_length=37, pattern=POSITION_PATTERN)),
)
LIMIT = QueryParam("limit", "events per page",
                   Integer(1, MAX_EVENT_LIMIT, DEFAULT_EVENT_LIMIT))

TAG = "events"
ROUTES = (
    Route("GET", "/events", list_events, "Events from the log, in log order (paged)", TAG,
          response=EventList, query=(*FILTERS, LIMIT)),
    Route("GET", "/events/stream", stream_events,
          "History, then live: one server-sent event per log event", TAG,
          response=str, media_type="text/event-stream", query=FILTERS,
          description="Each SSE `data:` is a LoggedEvent as JSON and its `id:` the event's "
                      "place in the log: a client that reconnects with `Last-Event-ID` "
                      "resumes after it. Comments (`: keep-alive`) are sent while the log is "
                      "quiet."),
    Route("GET", "/events/stats", event_stats, "Events per type", TAG, response=EventStats),
)


def add_routes(app: web.Application) -> None:
    add(app, ROUTES)
