"""A local Stripe-compatible server that the tests own: the real `stripe` library talks to it.

It speaks the parts of Stripe's API billing uses — form-encoded bodies with bracketed keys
(``payload[value]=25``, ``items[0][price]=…``), JSON answers and Stripe's error shape — and
enforces Stripe's rules that matter to billing:

- meter events (POST /v1/billing/meter_events): `event_name`, `payload[stripe_customer_id]`
  of an existing customer, `payload[value]` a whole number, `timestamp` within the past 35 days
  and at most 5 minutes ahead, `identifier` at most 100 characters and **unique** (a second
  one is refused, 400 `duplicate_meter_event`, as Stripe does within its window), and **one
  concurrent call per customer and meter** (another is refused: 409
  `too_many_concurrent_requests`);
- `Idempotency-Key` on POSTs: the same key and parameters replay the first answer
  (``Idempotent-Replayed: true``); the same key with other parameters is a 400
  `idempotency_error`;
- the API key (401 otherwise).

It records everything it receives and fails on demand (`fail`): an error status (429, 500…),
a slow answer (the client times out after Stripe accepted), a connection cut after accepting
(the crash between Stripe's answer and the caller's record), or a hang after accepting until
released.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.test_utils import TestServer

FaultKind = Literal["status", "slow", "drop_after_accept", "hang_after_accept"]
_WHOLE = re.compile(r"^-?\d+$")
MAX_AGE = 35 * 86400
MAX_AHEAD = 300


@dataclass
class Fault:
    path: str
    kind: FaultKind
    status: int = 500
    delay: float = 0.0
    times: int = 1


@dataclass
class MeterEventCall:
    identifier: str
    event_name: str
    customer: str
    value: str
    timestamp: int
    outcome: str
    """accepted, duplicate, refused (a rule), failed (an injected fault before accepting)."""


@dataclass
class StripeState:
    api_key: str
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Accepted meter events by identifier."""
    calls: list[MeterEventCall] = field(default_factory=list)
    v2_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    idempotency: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    concurrency_refusals: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    accepted_event: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_test{next(self._ids):08d}"

    def fail(self, path: str, kind: FaultKind = "status", *, status: int = 500,
             delay: float = 0.0, times: int = 1) -> None:
        """The next `times` requests to `path` fail so. Only meter events know every kind;
        other routes answer `status` faults."""
        self.faults.append(Fault(path, kind, status, delay, times))

    def take_fault(self, path: str) -> Fault | None:
        for f in self.faults:
            if f.path == path and f.times > 0:
                f.times -= 1
                if f.times == 0:
                    self.faults.remove(f)
                return f
        return None

    # ------------------------------------------------------------------ what tests read

    def total(self, event_name: str, customer: str | None = None) -> int:
        return sum(int(e["payload"]["value"]) for e in self.meter_events.values()
                   if e["event_name"] == event_name
                   and (customer is None or e["payload"]["stripe_customer_id"] == customer))

    def outcomes(self, outcome: str) -> list[MeterEventCall]:
        return [c for c in self.calls if c.outcome == outcome]

    def cancel_subscription(self, subscription_id: str) -> dict[str, Any]:
        """As Stripe's DELETE /v1/subscriptions/{id}: the subscription ends for good."""
        sub = self.subscriptions[subscription_id]
        sub.update(status="canceled", canceled_at=int(time.time()),
                   ended_at=int(time.time()))
        return sub

    def add_customer(self, tenant_id: str = "", name: str = "test") -> str:
        cid = self.new_id("cus")
        self.customers[cid] = _customer(cid, name, "", {"tenant_id": tenant_id} if tenant_id
                                        else {})
        return cid


STATE = web.AppKey("stripe_state", StripeState)


# --------------------------------------------------------------------------- form decoding


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding: ``a[b][0][c]=v`` → ``{"a": {"b": [{"c": "v"}]}}``."""
    out: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(body, keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head] + ([p.rstrip("]") for p in ("[" + rest).split("[")[1:]] if rest else [])
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt_is_index = not last and parts[i + 1].isdigit()
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = [] if nxt_is_index else {}
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, [] if nxt_is_index else {})
    return out


# --------------------------------------------------------------------------- answers


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(obj).encode(), status=status,
                        content_type="application/json",
                        headers={"Request-Id": f"req_{time.monotonic_ns()}"})


def _error(status: int, message: str, *, type_: str = "invalid_request_error",
           code: str | None = None, param: str | None = None) -> web.Response:
    err: dict[str, Any] = {"type": type_, "message": message}
    if code:
        err["code"] = code
    if param:
        err["param"] = param
    return _json({"error": err}, status)


def _customer(cid: str, name: str, email: str, metadata: dict[str, str]) -> dict[str, Any]:
    return {"id": cid, "object": "customer", "name": name, "email": email or None,
            "metadata": metadata, "created": int(time.time()), "livemode": False}


def _list(url: str, data: list[dict[str, Any]], *, search: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "search_result" if search else "list", "data": data,
                            "has_more": False, "url": url}
    if search:
        body["next_page"] = None
    return body


# --------------------------------------------------------------------------- middleware

METER_EVENTS = "/v1/billing/meter_events"


def _fault_answer(fault: Fault) -> web.Response:
    if fault.status == 429:
        return _error(429, "Request rate limit exceeded.", code="rate_limit")
    return _error(fault.status, "An unknown error occurred.", type_="api_error")



@web.middleware
async def stripe_rules(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests.append((request.method, request.path))
    if request.headers.get("Authorization") != f"Bearer {state.api_key}":
        return _error(401, "Invalid API Key provided.")
    if request.path != METER_EVENTS:  # the meter events route applies its own faults
        fault = state.take_fault(request.path)
        if fault is not None:
            return _fault_answer(fault)
    if request.method != "POST" or "Idempotency-Key" not in request.headers:
        response: web.StreamResponse = await handler(request)
        return response
    key = request.headers["Idempotency-Key"]
    body = await request.text()
    fingerprint = hashlib.sha256(f"{request.path}\n{body}".encode()).hexdigest()
    if key in state.idempotency:
        seen, status, stored = state.idempotency[key]
        if seen != fingerprint:
            return _error(400, "Keys for idempotent requests can only be used with the same "
                               "parameters they were first used with.",
                          type_="idempotency_error")
        return web.Response(body=stored, status=status, content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
    response = await handler(request)
    # Stripe saves the result of a request that executed; refusals before that are not saved.
    if isinstance(response, web.Response) and response.status < 500 \
            and response.status not in (409, 429) \
            and isinstance(response.body, bytes | bytearray):
        state.idempotency[key] = (fingerprint, response.status, bytes(response.body))
    return response


# --------------------------------------------------------------------------- routes


async def create_customer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = decode_form(await request.text())
    cid = state.new_id("cus")
    state.customers[cid] = _customer(cid, form.get("name", ""), form.get("email", ""),
                                     form.get("metadata", {}))
    return _json(state.customers[cid])


async def get_customer(request: web.Request) -> web.Response:
    found = request.app[STATE].customers.get(request.match_info["id"])
    if found is None:
        return _error(404, f"No such customer: '{request.match_info['id']}'",
                      code="resource_missing", param="id")
    return _json(found)


_SEARCH = re.compile(r"^metadata\['(\w+)'\]:'([^']*)'$")


async def search_customers(request: web.Request) -> web.Response:
    query = request.query.get("query", "")
    match = _SEARCH.match(query)
    if match is None:
        return _error(400, f"Unsupported search query: {query}", param="query")
    key, value = match.groups()
    hits = [c for c in request.app[STATE].customers.values() if c["metadata"].get(key) == value]
    return _json(_list("/v1/customers/search", hits, search=True))


async def create_subscription(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = decode_form(await request.text())
    customer = form.get("customer", "")
    if customer not in state.customers:
        return _error(400, f"No such customer: '{customer}'", code="resource_missing",
                      param="customer")
    sid = state.new_id("sub")
    items = [{"id": state.new_id("si"), "object": "subscription_item",
              "price": {"id": item["price"], "object": "price"}}
             for item in form.get("items", [])]
    state.subscriptions[sid] = {
        "id": sid, "object": "subscription", "customer": customer, "status": "active",
        "items": _list(f"/v1/subscription_items?subscription={sid}", items),
        "metadata": form.get("metadata", {}), "created": int(time.time()), "livemode": False}
    return _json(state.subscriptions[sid])


async def list_subscriptions(request: web.Request) -> web.Response:
    customer = request.query.get("customer")
    subs = [s for s in request.app[STATE].subscriptions.values()
            if customer is None or s["customer"] == customer]
    return _json(_list("/v1/subscriptions", subs))


async def cancel_subscription(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sid = request.match_info["id"]
    if sid not in state.subscriptions:
        return _error(404, f"No such subscription: '{sid}'", code="resource_missing",
                      param="id")
    return _json(state.cancel_subscription(sid))


async def get_v2_event(request: web.Request) -> web.Response:
    found = request.app[STATE].v2_events.get(request.match_info["id"])
    if found is None:
        return _json({"error": {"type": "not_found", "code": "not_found",
                                "message": "No such event"}}, 404)
    return _json(found)


async def create_meter_event(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    form = decode_form(await request.text())
    payload = form.get("payload") or {}
    customer = str(payload.get("stripe_customer_id", ""))
    event_name = str(form.get("event_name", ""))
    value = str(payload.get("value", ""))
    identifier = str(form.get("identifier") or state.new_id("mev"))
    try:
        timestamp = int(form.get("timestamp") or time.time())
    except ValueError:
        timestamp = -1

    def call(outcome: str) -> None:
        state.calls.append(MeterEventCall(identifier, event_name, customer, value, timestamp,
                                          outcome))

    fault = state.take_fault(request.path)
    if fault is not None and fault.kind == "status":
        call("failed")
        return _fault_answer(fault)
    key = (customer, event_name)
    if state.in_flight.get(key):
        state.concurrency_refusals += 1
        call("refused")
        return _error(409, "Too many concurrent requests for this customer and meter.",
                      code="too_many_concurrent_requests")
    state.in_flight[key] = 1
    try:
        refused = _check_meter_event(state, event_name, customer, value, timestamp, identifier)
        if refused is not None:
            call("duplicate" if "duplicate" in (refused.text or "") else "refused")
            return refused
        # Another call for this customer and meter may be waiting: being slow here is what
        # makes concurrent callers collide, as on Stripe.
        await asyncio.sleep(0.002)
        event = {"object": "billing.meter_event", "created": int(time.time()),
                 "event_name": event_name, "identifier": identifier, "livemode": False,
                 "payload": payload, "timestamp": timestamp}
        state.meter_events[identifier] = event
        call("accepted")
        state.accepted_event.set()
    finally:
        state.in_flight.pop(key, None)
    if fault is not None and fault.kind == "slow":
        await asyncio.sleep(fault.delay)
    elif fault is not None and fault.kind == "drop_after_accept":
        assert request.transport is not None
        request.transport.close()  # accepted, and the answer never arrives
        raise web.HTTPInternalServerError()
    elif fault is not None and fault.kind == "hang_after_accept":
        await state.release.wait()
    return _json(event)


def _check_meter_event(state: StripeState, event_name: str, customer: str, value: str,
                       timestamp: int, identifier: str) -> web.Response | None:
    if not event_name:
        return _error(400, "Missing required param: event_name.", code="parameter_missing",
                      param="event_name")
    if customer not in state.customers:
        return _error(400, f"No such customer: '{customer}'", code="resource_missing",
                      param="payload[stripe_customer_id]")
    if not _WHOLE.match(value):
        return _error(400, "The value must be a whole number.", code="parameter_invalid",
                      param="payload[value]")
    now = time.time()
    if not now - MAX_AGE <= timestamp <= now + MAX_AHEAD:
        return _error(400, "Timestamp must be within the past 35 days and at most 5 minutes "
                           "in the future.", code="parameter_invalid", param="timestamp")
    if len(identifier) > 100:
        return _error(400, "The identifier is longer than 100 characters.",
                      code="parameter_invalid", param="identifier")
    if identifier in state.meter_events:
        return _error(400, f"An event already exists with identifier {identifier}.",
                      code="duplicate_meter_event", param="identifier")
    return None


def create_stripe_app(api_key: str) -> web.Application:
    app = web.Application(middlewares=[stripe_rules])
    app[STATE] = StripeState(api_key)
    app.router.add_post("/v1/customers", create_customer)
    app.router.add_get("/v1/customers/search", search_customers)
    app.router.add_get("/v1/customers/{id}", get_customer)
    app.router.add_post("/v1/subscriptions", create_subscription)
    app.router.add_get("/v1/subscriptions", list_subscriptions)
    app.router.add_delete("/v1/subscriptions/{id}", cancel_subscription)
    app.router.add_post(METER_EVENTS, create_meter_event)
    app.router.add_get("/v2/core/events/{id}", get_v2_event)
    return app


@dataclass
class StripeServer:
    url: str
    api_key: str
    state: StripeState


@contextlib.asynccontextmanager
async def running_stripe(api_key: str = "sk_test_crosslogic_0123456789") -> AsyncIterator[
        StripeServer]:
    app = create_stripe_app(api_key)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield StripeServer(str(server.make_url("")).rstrip("/"), api_key, app[STATE])
    finally:
        app[STATE].release.set()
        await server.close()


# --------------------------------------------------------------------------- webhooks


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header, as Stripe computes it."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def snapshot_event(event_id: str, type_: str, obj: dict[str, Any], *,
                   created: int | None = None) -> bytes:
    """A v1 (snapshot) webhook body; `created`: when Stripe made the event (default: now)."""
    return json.dumps({"id": event_id, "object": "event", "api_version": "2025-03-31.basil",
                       "created": int(time.time()) if created is None else created,
                       "livemode": False, "pending_webhooks": 1,
                       "request": {"id": None, "idempotency_key": None}, "type": type_,
                       "data": {"object": obj}}).encode()


def thin_event(event_id: str, type_: str, related: dict[str, Any]) -> bytes:
    """A v2 thin event notification body (event destinations)."""
    return json.dumps({"id": event_id, "object": "v2.core.event", "type": type_,
                       "created": "2026-01-01T00:00:00.000Z", "livemode": False,
                       "related_object": related}).encode()
