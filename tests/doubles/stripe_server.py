"""A local Stripe-compatible server that the tests own: the real `stripe` library talks to it.

It speaks the parts of Stripe's API billing uses — form-encoded bodies and query strings with
bracketed keys (``payload[value]=25``, ``items[0][price]=…``, ``lookup_keys[0]=…`` or
``lookup_keys[]=…``), JSON answers, Stripe's error shape and list shape (``limit``,
``starting_after``, ``has_more``) — and enforces Stripe's rules that matter to billing:

- meter events (POST /v1/billing/meter_events): `event_name`, `payload[stripe_customer_id]`
  of an existing customer, `payload[value]` a whole number of at most 15 digits (400
  `meter_event_value_too_many_digits`), `timestamp` within the past 35 days and at most
  5 minutes ahead, `identifier` at most 100 characters and **unique** (a second one is
  refused, 400 `duplicate_meter_event`, as Stripe does within its window), and **one
  concurrent call per customer and meter** (another is refused: 409
  `too_many_concurrent_requests`). As on Stripe, an event is accepted whether or not a meter
  listens for its `event_name` (Stripe reports that later, not in the answer);
- billing meters (POST/GET /v1/billing/meters, GET /v1/billing/meters/{id},
  POST …/{id}/deactivate and …/reactivate): `display_name`, `event_name`,
  `default_aggregation[formula]` sum|count|last, `customer_mapping` by_id, `value_settings`;
  **one active meter per `event_name`** (a second is refused, 400);
- products (POST /v1/products, GET /v1/products/{id}): `name` required; an `id` of the
  caller's is refused when taken;
- prices (POST/GET /v1/prices, GET/POST /v1/prices/{id}): an existing `product`; one of
  `unit_amount` (whole cents) or `unit_amount_decimal` (plain decimal string in cents, at most
  12 decimal places; exponent notation such as ``1E-7`` is refused); `billing_scheme`
  per_unit only; `recurring[interval]`, `recurring[usage_type]` metered|licensed, and a
  metered price names an existing active meter (`recurring[meter]`); a `lookup_key` is held
  by one price at a time (active or archived): another price asking for it is refused unless
  `transfer_lookup_key=true`, which moves it. The amount of a price never changes (POST
  /v1/prices/{id} takes `active`, `lookup_key`, `nickname`, `metadata` only);
- subscriptions (POST/GET /v1/subscriptions, GET/DELETE /v1/subscriptions/{id}) carry their
  items (`items[i][price]`): the same price twice is refused; a price the double knows must
  be active and recurring (a price id it does not know is taken on trust, shown as
  ``{"id": …, "object": "price"}``); POST /v1/subscription_items adds one to a subscription
  that has not ended, refusing an unknown, archived or one-time price, one already on the
  subscription, or one of another currency or interval; GET /v1/subscription_items lists them;
- the new routes refuse parameters Stripe does not know (400 `parameter_unknown`), as Stripe
  does: a misspelt parameter fails here, not only in production;
- `Idempotency-Key` on POSTs: the same key and parameters replay the first answer
  (``Idempotent-Replayed: true``); the same key with other parameters is a 400
  `idempotency_error`;
- the API key (401 otherwise).

It records everything it receives and fails on demand (`fail`): an error status (429, 500…),
a slow answer (the client times out after Stripe accepted), a connection cut after accepting
(the crash between Stripe's answer and the caller's record), or a hang after accepting until
released. For tests it previews what Stripe would invoice for metered usage
(`StripeState.invoice_lines`, `invoice_total_cents`, `meter_usage`).
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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, Inexact, InvalidOperation, localcontext
from typing import Any, Literal

from aiohttp import web
from aiohttp.test_utils import TestServer

FaultKind = Literal["status", "slow", "drop_after_accept", "hang_after_accept"]
_WHOLE = re.compile(r"^-?\d+$")
_PLAIN_DECIMAL = re.compile(r"^\d+(\.\d+)?$")
MAX_AGE = 35 * 86400
MAX_AHEAD = 300
MAX_VALUE_DIGITS = 15
MAX_DECIMAL_PLACES = 12
ENDED = frozenset({"canceled", "incomplete_expired"})
FORMULAS = frozenset({"sum", "count", "last"})
INTERVALS = frozenset({"day", "week", "month", "year"})


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


@dataclass(frozen=True)
class InvoiceLine:
    """One metered line of the invoice Stripe would draw up for a period."""

    subscription: str
    subscription_item: str
    price: str
    meter: str
    event_name: str
    quantity: Decimal
    """The meter's aggregate of the customer's events in the period."""
    amount: Decimal
    """quantity times the price's unit amount, in cents, exactly."""
    amount_rounded: int
    """`amount` rounded to a whole cent, as the invoice shows it."""


@dataclass
class StripeState:
    api_key: str
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Accepted meter events by identifier."""
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
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

    # ------------------------------------------------------------------ invoice preview

    def meter_usage(self, meter_id: str, customer_id: str, start: int, end: int) -> Decimal:
        """The meter's aggregate of the customer's accepted events with `timestamp` in
        [start, end) (unix seconds): the sum of their values, their count, or the value of
        the last one (by timestamp, then by arrival), as the meter's formula says."""
        meter = self.meters[meter_id]
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        events = sorted((e for e in self.meter_events.values()
                         if e["event_name"] == meter["event_name"]
                         and e["payload"].get(customer_key) == customer_id
                         and start <= e["timestamp"] < end),
                        key=lambda e: e["timestamp"])  # stable: arrival order within a second
        formula = meter["default_aggregation"]["formula"]
        if formula == "count":
            return Decimal(len(events))
        values = [Decimal(str(e["payload"][value_key])) for e in events
                  if value_key in e["payload"]]
        if formula == "last":
            return values[-1] if values else Decimal(0)
        with localcontext() as ctx:
            ctx.prec, ctx.traps[Inexact] = 200, True
            return sum(values, Decimal(0))

    def invoice_lines(self, customer_id: str, start: int, end: int) -> list[InvoiceLine]:
        """What Stripe would invoice the customer for metered usage in [start, end): one line
        per item of each of the customer's subscriptions that has not ended whose price (one
        the double knows) is metered on a meter. Licensed prices and prices the double does
        not know are left out."""
        lines: list[InvoiceLine] = []
        for sub in self.subscriptions.values():
            if sub["customer"] != customer_id or sub["status"] in ENDED:
                continue
            for item in sub["items"]["data"]:
                price = self.prices.get(item["price"]["id"])
                recurring = price.get("recurring") if price else None
                if price is None or not recurring or recurring["usage_type"] != "metered" \
                        or recurring["meter"] not in self.meters:
                    continue
                meter = self.meters[recurring["meter"]]
                quantity = self.meter_usage(meter["id"], customer_id, start, end)
                with localcontext() as ctx:
                    ctx.prec, ctx.traps[Inexact] = 200, True  # exact, or fail loudly
                    amount = quantity * Decimal(price["unit_amount_decimal"])
                    ctx.traps[Inexact] = False
                    # Assumption (not checked against Stripe's documentation): each line's
                    # amount is rounded to a whole cent half up, i.e. half away from zero.
                    rounded = int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))
                lines.append(InvoiceLine(
                    subscription=sub["id"], subscription_item=item["id"], price=price["id"],
                    meter=meter["id"], event_name=meter["event_name"], quantity=quantity,
                    amount=amount, amount_rounded=rounded))
        return lines

    def invoice_total_cents(self, customer_id: str, start: int, end: int) -> int:
        """The invoice's total: the sum of its lines' rounded amounts (Stripe adds up lines
        as shown, it does not round the sum of exact amounts)."""
        return sum(line.amount_rounded for line in self.invoice_lines(customer_id, start, end))


STATE = web.AppKey("stripe_state", StripeState)


# --------------------------------------------------------------------------- form decoding


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding: ``a[b][0][c]=v`` → ``{"a": {"b": [{"c": "v"}]}}``; an empty
    index appends (``a[]=x&a[]=y`` → ``{"a": ["x", "y"]}``). Query strings decode the same."""
    out: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(body, keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head] + ([p.rstrip("]") for p in ("[" + rest).split("[")[1:]] if rest else [])
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt_is_index = not last and (parts[i + 1].isdigit() or parts[i + 1] == "")
            if isinstance(node, list):
                idx = len(node) if part == "" else int(part)
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


def _missing(param: str) -> web.Response:
    return _error(400, f"Missing required param: {param}.", code="parameter_missing",
                  param=param)


def _no_such(kind: str, oid: str, param: str, status: int = 400) -> web.Response:
    return _error(status, f"No such {kind}: '{oid}'", code="resource_missing", param=param)


Shape = Mapping[str, "Shape | None"]
"""The parameters a route knows: a name maps to None (a value, a list or free-form metadata)
or to the shape of the object it takes."""


def _unknown_param(form: Mapping[str, Any], shape: Shape, prefix: str = "") -> web.Response | None:
    """Stripe refuses a parameter it does not know: ``Received unknown parameter: a[b]``."""
    for key, value in form.items():
        name = f"{prefix}[{key}]" if prefix else key
        if key not in shape:
            return _error(400, f"Received unknown parameter: {name}", code="parameter_unknown",
                          param=name)
        inner = shape[key]
        if inner is not None:
            if not isinstance(value, dict):
                return _error(400, f"Invalid object: {name} must be an object.",
                              code="parameter_invalid_object", param=name)
            refused = _unknown_param(value, inner, name)
            if refused is not None:
                return refused
    return None


def _invalid(message: str, param: str) -> web.Response:
    return _error(400, message, code="parameter_invalid", param=param)


def _bool(value: Any) -> bool | None:
    """Stripe's booleans on the wire: ``true`` / ``false``; anything else is None."""
    return {"true": True, "false": False}.get(str(value))


def _page(url: str, items: list[dict[str, Any]], query: Mapping[str, Any]) -> web.Response:
    """A page of `items` (newest first) as Stripe lists: `limit` (1 to 100, default 10),
    `starting_after` / `ending_before` an id of the list, `has_more`."""
    try:
        limit = int(query.get("limit", 10))
    except ValueError:
        return _invalid(f"Invalid integer: {query['limit']}", "limit")
    if not 1 <= limit <= 100:
        return _invalid("This value must be greater than or equal to 1 and less than or "
                        "equal to 100.", "limit")
    ids = [i["id"] for i in items]
    for cursor in ("starting_after", "ending_before"):
        if cursor in query and query[cursor] not in ids:
            return _no_such("object", str(query[cursor]), cursor)
    if "starting_after" in query:
        rest = items[ids.index(query["starting_after"]) + 1:]
        return _json({**_list(url, rest[:limit]), "has_more": len(rest) > limit})
    if "ending_before" in query:
        before = items[:ids.index(query["ending_before"])]
        return _json({**_list(url, before[-limit:]), "has_more": len(before) > limit})
    return _json({**_list(url, items[:limit]), "has_more": len(items) > limit})


def _query(request: web.Request) -> dict[str, Any]:
    """The query string decoded as a form (``lookup_keys[0]=a`` → a list); the raw string,
    so that an encoded ``&`` inside a value stays in the value."""
    return decode_form(request.rel_url.raw_query_string)


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
    wanted = [i for i in form.get("items") or [] if isinstance(i, dict)]
    items: list[dict[str, Any]] = []
    for n, item in enumerate(wanted):
        price_id = str(item.get("price", ""))
        if not price_id:
            return _missing(f"items[{n}][price]")
        refused = _refuse_item_price(state, items, price_id, item.get("quantity"),
                                     f"items[{n}]", known_only=False)
        if refused is not None:
            return refused
        items.append(_subscription_item(state, sid, price_id, item.get("metadata") or {},
                                        item.get("quantity")))
    state.subscriptions[sid] = {
        "id": sid, "object": "subscription", "customer": customer, "status": "active",
        "currency": _currency(state, items),
        "items": _list(f"/v1/subscription_items?subscription={sid}", items),
        "metadata": form.get("metadata", {}), "created": int(time.time()), "livemode": False}
    return _json(state.subscriptions[sid])


def _currency(state: StripeState, items: list[dict[str, Any]]) -> str | None:
    for item in items:
        price = state.prices.get(item["price"]["id"])
        if price is not None:
            return str(price["currency"])
    return None


def _subscription_item(state: StripeState, sid: str, price_id: str,
                       metadata: dict[str, str], quantity: Any) -> dict[str, Any]:
    """A subscription item. Its price is the double's own price object when it knows the id
    (the same object: an archived price shows as archived on the item too)."""
    price = state.prices.get(price_id, {"id": price_id, "object": "price"})
    metered = (price.get("recurring") or {}).get("usage_type") == "metered"
    if quantity is not None:
        quantity = int(quantity)
    elif price_id in state.prices and not metered:
        quantity = 1
    return {"id": state.new_id("si"), "object": "subscription_item",
            "created": int(time.time()), "metadata": metadata, "price": price,
            "quantity": quantity, "subscription": sid, "discounts": [], "tax_rates": []}


def _refuse_item_price(state: StripeState, items: list[dict[str, Any]], price_id: str,
                       quantity: Any, prefix: str, *, known_only: bool) -> web.Response | None:
    """Stripe's rules for a price (and quantity) joining a subscription's `items`; `prefix`:
    where the item's parameters are (``items[0]``, or "" at the top). `known_only`: a price id
    the double does not know is refused (else taken on trust, as the older tests need)."""
    param = f"{prefix}[price]" if prefix else "price"
    quantity_param = f"{prefix}[quantity]" if prefix else "quantity"
    if quantity is not None and not (isinstance(quantity, str) and quantity.isdigit()):
        return _invalid(f"Invalid integer: {quantity}", quantity_param)
    if any(i["price"]["id"] == price_id for i in items):
        return _invalid("Cannot add multiple subscription items with the same price: "
                        f"{price_id}", param)
    price = state.prices.get(price_id)
    if price is None:
        return _no_such("price", price_id, param) if known_only else None
    if not price["active"]:
        return _invalid("The price specified is inactive. This field only accepts active "
                        "prices.", param)
    if price["type"] != "recurring":
        return _invalid("The price specified is set to `type=one_time` but this field only "
                        "accepts prices with `type=recurring`.", param)
    if quantity is not None and price["recurring"]["usage_type"] == "metered":
        return _invalid("Quantity should not be specified where usage_type is `metered`. "
                        "Remove quantity from the request.", quantity_param)
    for item in items:
        other = state.prices.get(item["price"]["id"])
        if other is None:
            continue
        if other["currency"] != price["currency"]:
            return _invalid("The price specified does not match the currency of the "
                            f"subscription ({other['currency']}): {price['currency']}.",
                            param)
        if (other["recurring"]["interval"], other["recurring"]["interval_count"]) != \
                (price["recurring"]["interval"], price["recurring"]["interval_count"]):
            return _invalid("The price specified has a billing interval that does not match "
                            "the other items of the subscription.", param)
    return None



async def _form(request: web.Request, shape: Shape) -> dict[str, Any] | web.Response:
    """The request's form, or Stripe's refusal of a parameter `shape` does not know."""
    form = decode_form(await request.text())
    refused = _unknown_param(form, shape)
    return form if refused is None else refused


def _active_and_metadata(form: Mapping[str, Any]) -> tuple[bool, dict[str, Any]] | web.Response:
    """A product's or price's `active` (default true) and `metadata`, or Stripe's refusal."""
    active = _bool(form.get("active", "true"))
    if active is None:
        return _invalid(f"Invalid boolean: {form['active']}", "active")
    metadata = form.get("metadata") or {}
    if not isinstance(metadata, dict):
        return _invalid("Invalid object: metadata must be an object.", "metadata")
    return active, metadata


_SUBSCRIPTION_ITEM: Shape = {
    "subscription": None, "price": None, "proration_behavior": None, "metadata": None,
    "quantity": None, "payment_behavior": None, "expand": None}


async def create_subscription_item(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await _form(request, _SUBSCRIPTION_ITEM)
    if isinstance(form, web.Response):
        return form
    sid = str(form.get("subscription", ""))
    price_id = str(form.get("price", ""))
    if not sid:
        return _missing("subscription")
    if not price_id:
        return _missing("price")
    sub = state.subscriptions.get(sid)
    if sub is None:
        return _no_such("subscription", sid, "subscription")
    if sub["status"] in ENDED:
        return _invalid(f"A {sub['status']} subscription can only update its "
                        "cancellation_details and metadata.", "subscription")
    proration = form.get("proration_behavior", "create_prorations")
    if proration not in ("create_prorations", "none", "always_invoice"):
        return _invalid("Invalid proration_behavior: must be one of create_prorations, none, "
                        "or always_invoice", "proration_behavior")
    items: list[dict[str, Any]] = sub["items"]["data"]
    refused = _refuse_item_price(state, items, price_id, form.get("quantity"), "",
                                 known_only=True)
    if refused is not None:
        return refused
    metadata = form.get("metadata") or {}
    if not isinstance(metadata, dict):
        return _invalid("Invalid object: metadata must be an object.", "metadata")
    item = _subscription_item(state, sid, price_id, metadata, form.get("quantity"))
    items.append(item)
    if sub.get("currency") is None:
        sub["currency"] = _currency(state, items)
    return _json(item)


async def list_subscription_items(request: web.Request) -> web.Response:
    state = request.app[STATE]
    query = _query(request)
    refused = _unknown_param(query, {"subscription": None, "limit": None,
                                     "starting_after": None, "ending_before": None,
                                     "expand": None})
    if refused is not None:
        return refused
    sid = str(query.get("subscription", ""))
    if not sid:
        return _missing("subscription")
    sub = state.subscriptions.get(sid)
    if sub is None:
        return _no_such("subscription", sid, "subscription")
    return _page("/v1/subscription_items", list(sub["items"]["data"]), query)


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
    if len(value.lstrip("-").lstrip("0")) > MAX_VALUE_DIGITS:
        return _error(400, f"The value in the event payload can have at most "
                           f"{MAX_VALUE_DIGITS} digits. Received {value}.",
                      code="meter_event_value_too_many_digits", param="payload[value]")
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


# --------------------------------------------------------------------------- catalog

_METER: Shape = {
    "display_name": None, "event_name": None, "event_time_window": None, "expand": None,
    "default_aggregation": {"formula": None},
    "customer_mapping": {"event_payload_key": None, "type": None},
    "value_settings": {"event_payload_key": None}}


async def create_meter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await _form(request, _METER)
    if isinstance(form, web.Response):
        return form
    for required in ("display_name", "event_name"):
        if not form.get(required):
            return _missing(required)
    formula = (form.get("default_aggregation") or {}).get("formula")
    if not formula:
        return _missing("default_aggregation[formula]")
    if formula not in FORMULAS:
        return _invalid(f"Invalid default_aggregation[formula]: must be one of count, last, "
                        f"or sum (received {formula})", "default_aggregation[formula]")
    mapping = {"event_payload_key": "stripe_customer_id", "type": "by_id",
               **(form.get("customer_mapping") or {})}
    if mapping["type"] != "by_id":
        return _invalid("Invalid customer_mapping[type]: must be by_id",
                        "customer_mapping[type]")
    if not mapping["event_payload_key"]:
        return _missing("customer_mapping[event_payload_key]")
    values = {"event_payload_key": "value", **(form.get("value_settings") or {})}
    if not values["event_payload_key"]:
        return _missing("value_settings[event_payload_key]")
    window = form.get("event_time_window")
    if window is not None and window not in ("day", "hour"):
        return _invalid("Invalid event_time_window: must be one of day or hour",
                        "event_time_window")
    event_name = str(form["event_name"])
    if len(event_name) > 100:
        return _invalid("The event_name is longer than 100 characters.", "event_name")
    refused = _refuse_taken_event_name(state, event_name)
    if refused is not None:
        return refused
    mid = state.new_id("mtr")
    now = int(time.time())
    state.meters[mid] = {
        "id": mid, "object": "billing.meter", "created": now, "updated": now,
        "customer_mapping": mapping, "default_aggregation": {"formula": formula},
        "display_name": form["display_name"], "event_name": event_name,
        "event_time_window": window, "livemode": False, "status": "active",
        "status_transitions": {"deactivated_at": None}, "value_settings": values}
    return _json(state.meters[mid])


def _refuse_taken_event_name(state: StripeState, event_name: str) -> web.Response | None:
    for meter in state.meters.values():
        if meter["status"] == "active" and meter["event_name"] == event_name:
            return _invalid(f"A meter with event_name `{event_name}` already exists "
                            f"({meter['id']}). An event_name can only be used by one active "
                            "meter.", "event_name")
    return None


async def list_meters(request: web.Request) -> web.Response:
    query = _query(request)
    refused = _unknown_param(query, {"status": None, "limit": None, "starting_after": None,
                                     "ending_before": None, "expand": None})
    if refused is not None:
        return refused
    status = query.get("status")
    if status is not None and status not in ("active", "inactive"):
        return _invalid("Invalid status: must be one of active or inactive", "status")
    meters = [m for m in reversed(request.app[STATE].meters.values())
              if status is None or m["status"] == status]
    return _page("/v1/billing/meters", meters, query)



async def set_meter_status(request: web.Request) -> web.Response:
    """POST /v1/billing/meters/{id}/deactivate and …/reactivate."""
    state = request.app[STATE]
    meter = state.meters.get(request.match_info["id"])
    if meter is None:
        return _no_such("billing.meter", request.match_info["id"], "id", 404)
    refused = _unknown_param(decode_form(await request.text()), {"expand": None})
    if refused is not None:
        return refused
    now = int(time.time())
    if request.match_info["action"] == "deactivate":
        meter.update(status="inactive", updated=now,
                     status_transitions={"deactivated_at": now})
    elif meter["status"] != "active":
        refused = _refuse_taken_event_name(state, meter["event_name"])
        if refused is not None:
            return refused
        meter.update(status="active", updated=now, status_transitions={"deactivated_at": None})
    return _json(meter)


_PRODUCT: Shape = {"id": None, "name": None, "metadata": None, "description": None,
                   "active": None, "expand": None}


async def create_product(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await _form(request, _PRODUCT)
    if isinstance(form, web.Response):
        return form
    if not form.get("name"):
        return _missing("name")
    pid = str(form.get("id") or state.new_id("prod"))
    if pid in state.products:
        return _error(400, "Product already exists.", code="resource_already_exists",
                      param="id")
    flags = _active_and_metadata(form)
    if isinstance(flags, web.Response):
        return flags
    active, metadata = flags
    now = int(time.time())
    state.products[pid] = {
        "id": pid, "object": "product", "active": active, "created": now, "updated": now,
        "default_price": None, "description": form.get("description") or None,
        "livemode": False, "metadata": metadata, "name": form["name"]}
    return _json(state.products[pid])



_PRICE: Shape = {
    "currency": None, "product": None, "unit_amount": None, "unit_amount_decimal": None,
    "billing_scheme": None, "lookup_key": None, "transfer_lookup_key": None,
    "nickname": None, "metadata": None, "active": None, "tax_behavior": None, "expand": None,
    "recurring": {"interval": None, "interval_count": None, "usage_type": None,
                  "meter": None}}
_PRICE_UPDATE: Shape = {"active": None, "lookup_key": None, "transfer_lookup_key": None,
                        "nickname": None, "metadata": None, "tax_behavior": None,
                        "expand": None}


def _plain(amount: Decimal) -> str:
    """A decimal as Stripe writes one: no exponent, no trailing zeros."""
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _unit_amount(form: Mapping[str, Any]) -> tuple[int | None, str] | web.Response:
    """(`unit_amount`, `unit_amount_decimal`) of a new price, as Stripe shows them: the
    decimal always, the whole amount when the decimal is a whole number."""
    whole, decimal = form.get("unit_amount"), form.get("unit_amount_decimal")
    if whole is not None and decimal is not None:
        return _invalid("You may only specify one of these parameters: unit_amount, "
                        "unit_amount_decimal.", "unit_amount")
    if whole is None and decimal is None:
        return _missing("unit_amount")
    if whole is not None:
        if not (isinstance(whole, str) and whole.isdigit()):
            return _invalid(f"Invalid integer: {whole}", "unit_amount")
        return int(whole), str(int(whole))
    text = str(decimal)
    if not _PLAIN_DECIMAL.match(text):
        # A negative amount, or what Python's str(Decimal) writes for small or normalized
        # values (1E-7, 1E+2): the stripe library sends those as they are.
        return _invalid(f"Invalid decimal: {text}", "unit_amount_decimal")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        return _invalid(f"Invalid decimal: {text}", "unit_amount_decimal")
    exponent = amount.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # a finite number: the pattern above
    if -exponent > MAX_DECIMAL_PLACES:
        return _invalid(f"Invalid decimal: {text}; must contain at maximum "
                        f"{MAX_DECIMAL_PLACES} decimal places.", "unit_amount_decimal")
    return (int(amount) if amount == amount.to_integral_value() else None), _plain(amount)


def _recurring(state: StripeState,
               form: Mapping[str, Any]) -> dict[str, Any] | web.Response | None:
    asked = form.get("recurring")
    if asked is None:
        return None
    interval = asked.get("interval")
    if not interval:
        return _missing("recurring[interval]")
    if interval not in INTERVALS:
        return _invalid(f"Invalid recurring[interval]: must be one of day, month, week, or "
                        f"year (received {interval})", "recurring[interval]")
    count = str(asked.get("interval_count", "1"))
    if not count.isdigit() or int(count) < 1:
        return _invalid(f"Invalid integer: {count}", "recurring[interval_count]")
    usage_type = asked.get("usage_type", "licensed")
    if usage_type not in ("licensed", "metered"):
        return _invalid(f"Invalid recurring[usage_type]: must be one of licensed or metered "
                        f"(received {usage_type})", "recurring[usage_type]")
    meter = asked.get("meter") or None
    if usage_type == "metered":
        if meter is None:
            return _missing("recurring[meter]")
        if meter not in state.meters:
            return _no_such("billing.meter", meter, "recurring[meter]")
        if state.meters[meter]["status"] != "active":
            return _invalid(f"The meter {meter} is inactive.", "recurring[meter]")
    elif meter is not None:
        return _invalid("recurring[meter] can only be set when recurring[usage_type] is "
                        "metered.", "recurring[meter]")
    return {"interval": interval, "interval_count": int(count), "meter": meter,
            "trial_period_days": None, "usage_type": usage_type}


def _take_lookup_key(state: StripeState, form: Mapping[str, Any],
                     price_id: str) -> web.Response | None:
    """Refuses a lookup key another price holds, unless `transfer_lookup_key` moves it here.
    Checks only: `_move_lookup_key` moves it once the request is sure to succeed."""
    key = form.get("lookup_key")
    if key is None or key == "":
        return None
    if len(key) > 200:
        return _invalid("The lookup_key is longer than 200 characters.", "lookup_key")
    transfer = _bool(form.get("transfer_lookup_key", "false"))
    if transfer is None:
        return _invalid(f"Invalid boolean: {form['transfer_lookup_key']}",
                        "transfer_lookup_key")
    for other in state.prices.values():
        if other["id"] != price_id and other["lookup_key"] == key and not transfer:
            return _invalid(f"A price (`{other['id']}`) already uses that lookup key.",
                            "lookup_key")
    return None


def _move_lookup_key(state: StripeState, key: str | None, price_id: str) -> None:
    for other in state.prices.values():
        if other["id"] != price_id and key and other["lookup_key"] == key:
            other["lookup_key"] = None


async def create_price(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await _form(request, _PRICE)
    if isinstance(form, web.Response):
        return form
    currency = str(form.get("currency", "")).lower()
    if not currency:
        return _missing("currency")
    if not re.fullmatch(r"[a-z]{3}", currency):
        return _invalid(f"Invalid currency: {currency}.", "currency")
    product = str(form.get("product", ""))
    if not product:
        return _missing("product")
    if product not in state.products:
        return _no_such("product", product, "product")
    scheme = form.get("billing_scheme", "per_unit")
    if scheme != "per_unit":
        return _invalid(f"billing_scheme={scheme} is not supported by the test double "
                        "(per_unit only).", "billing_scheme")
    amounts = _unit_amount(form)
    if isinstance(amounts, web.Response):
        return amounts
    recurring = _recurring(state, form)
    if isinstance(recurring, web.Response):
        return recurring
    flags = _active_and_metadata(form)
    if isinstance(flags, web.Response):
        return flags
    active, metadata = flags
    pid = state.new_id("price")
    refused = _take_lookup_key(state, form, pid)
    if refused is not None:
        return refused
    lookup_key = form.get("lookup_key") or None
    _move_lookup_key(state, lookup_key, pid)
    state.prices[pid] = {
        "id": pid, "object": "price", "active": active, "billing_scheme": "per_unit",
        "created": int(time.time()), "currency": currency, "custom_unit_amount": None,
        "livemode": False, "lookup_key": lookup_key, "metadata": metadata,
        "nickname": form.get("nickname") or None, "product": product,
        "recurring": recurring, "tax_behavior": form.get("tax_behavior", "unspecified"),
        "tiers_mode": None, "transform_quantity": None,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": amounts[0], "unit_amount_decimal": amounts[1]}
    return _json(state.prices[pid])


async def update_price(request: web.Request) -> web.Response:
    """POST /v1/prices/{id}: a price's amount never changes; these may."""
    state = request.app[STATE]
    price = state.prices.get(request.match_info["id"])
    if price is None:
        return _no_such("price", request.match_info["id"], "id", 404)
    form = decode_form(await request.text())
    refused = _unknown_param(form, _PRICE_UPDATE)
    if refused is None:
        refused = _take_lookup_key(state, form, price["id"])
    if refused is not None:
        return refused
    changes: dict[str, Any] = {}
    if "active" in form:
        active = _bool(form["active"])
        if active is None:
            return _invalid(f"Invalid boolean: {form['active']}", "active")
        changes["active"] = active
    if "metadata" in form:
        if not isinstance(form["metadata"], dict):
            return _invalid("Invalid object: metadata must be an object.", "metadata")
        # Stripe merges metadata; an empty value removes a key.
        merged = {**price["metadata"], **form["metadata"]}
        changes["metadata"] = {k: v for k, v in merged.items() if v != ""}
    for name in ("nickname", "tax_behavior"):
        if name in form:
            changes[name] = form[name] or None
    if "lookup_key" in form:
        changes["lookup_key"] = form["lookup_key"] or None
        _move_lookup_key(state, changes["lookup_key"], price["id"])
    price.update(changes)
    return _json(price)


async def list_prices(request: web.Request) -> web.Response:
    query = _query(request)
    refused = _unknown_param(query, {
        "active": None, "currency": None, "product": None, "lookup_keys": None, "type": None,
        "limit": None, "starting_after": None, "ending_before": None, "expand": None,
        "created": None, "recurring": {"interval": None, "meter": None, "usage_type": None}})
    if refused is not None:
        return refused
    active = None
    if "active" in query:
        active = _bool(query["active"])
        if active is None:
            return _invalid(f"Invalid boolean: {query['active']}", "active")
    keys = query.get("lookup_keys")
    if keys is not None and not isinstance(keys, list):
        return _invalid("Invalid array", "lookup_keys")
    if keys is not None and len(keys) > 10:
        return _invalid("lookup_keys can hold at most 10 keys.", "lookup_keys")
    recurring = query.get("recurring") or {}

    def wanted(p: dict[str, Any]) -> bool:
        rec = p["recurring"] or {}
        return ((active is None or p["active"] == active)
                and all(query[f] == p[f] for f in ("currency", "product", "type")
                        if f in query)
                and (keys is None or p["lookup_key"] in keys)
                and all(rec.get(f) == v for f, v in recurring.items()))

    prices = [p for p in reversed(request.app[STATE].prices.values()) if wanted(p)]
    return _page("/v1/prices", prices, query)



def _get_one(collection: str, object_name: str) -> Any:
    """GET /v1/<things>/{id}: the stored object, or Stripe's 404."""
    async def handler(request: web.Request) -> web.Response:
        found = getattr(request.app[STATE], collection).get(request.match_info["id"])
        if found is None:
            return _no_such(object_name, request.match_info["id"], "id", 404)
        return _json(found)

    return handler


def create_stripe_app(api_key: str) -> web.Application:
    app = web.Application(middlewares=[stripe_rules])
    app[STATE] = StripeState(api_key)
    app.router.add_post("/v1/customers", create_customer)
    app.router.add_get("/v1/customers/search", search_customers)
    app.router.add_get("/v1/customers/{id}", get_customer)
    app.router.add_post("/v1/subscriptions", create_subscription)
    app.router.add_get("/v1/subscriptions", list_subscriptions)
    app.router.add_get("/v1/subscriptions/{id}", _get_one("subscriptions", "subscription"))
    app.router.add_delete("/v1/subscriptions/{id}", cancel_subscription)
    app.router.add_post("/v1/subscription_items", create_subscription_item)
    app.router.add_get("/v1/subscription_items", list_subscription_items)
    app.router.add_post(METER_EVENTS, create_meter_event)
    app.router.add_post("/v1/billing/meters", create_meter)
    app.router.add_get("/v1/billing/meters", list_meters)
    app.router.add_get("/v1/billing/meters/{id}", _get_one("meters", "billing.meter"))
    app.router.add_post("/v1/billing/meters/{id}/{action:deactivate|reactivate}",
                        set_meter_status)
    app.router.add_post("/v1/products", create_product)
    app.router.add_get("/v1/products/{id}", _get_one("products", "product"))
    app.router.add_post("/v1/prices", create_price)
    app.router.add_get("/v1/prices", list_prices)
    app.router.add_get("/v1/prices/{id}", _get_one("prices", "price"))
    app.router.add_post("/v1/prices/{id}", update_price)
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
