"""Schemathesis against the real admin service: every operation of its OpenAPI document, every
check Schemathesis has, the examples, coverage and fuzzing phases (one test per operation)
and the stateful phase (chains of calls along the links Schemathesis infers), with a fixed
seed.

The admin service runs as its own process (`python -m services.admin`) on a real port, with
its token and the embedded PostgreSQL, Redis and NATS of the other tests; Schemathesis's
calls are synchronous HTTP requests to it. The service keeps no state of its own, so one
process serves the module while every test starts from freshly truncated tables (the
`database_url` fixture): whatever a test deletes, suspends, revokes or terminates is something
its own run created.

Deterministic: Hypothesis derandomized with no example database, Schemathesis's seed fixed,
and generation does not feed on the ids the server hands out (they differ between runs).

What the server refuses on purpose although JSON Schema would allow it (docs/admin-api.md,
"Bounded input"; each field's description says so) is kept out of what is sent, by
`_within_documented_rules`, which every case goes through before its call: a whole number
written as a float, an `expires_at` in the past, `min_nodes` above `max_nodes`, a usage
window that ends before it starts or spans more than 366 days. The case as sent is the one
checked (Schemathesis revalidates a case whose parts a test changed): a negative case that
became valid is then expected to be accepted. One check is left out on one operation, for
the reason `_checks` gives.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import hypothesis
import msgspec
import pytest
import schemathesis
from schemathesis import Case, Response
from schemathesis.checks import CHECKS, CheckFunction, load_all_checks, not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    object_level_authorization,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
)

from services.admin.openapi import CHECKED_IN
from services.domain.usage_queries import EARLIEST, LATEST, MAX_SPAN
from services.infra.devstack import die_with_parent, free_port
from services.infra.natsauth.identities import Role
from services.infra.timeparse import parse_since
from tests.conftest import Servers, _truncate_all

TOKEN = "admin-schemathesis-token-3c8e1f6a9b2d4e70"
SEED = 20_240_611
EXAMPLES = 30
"""Fuzzed cases per operation; the examples and coverage phases add their own, as many as
the document calls for."""
STATEFUL_SCENARIOS = 30
STATEFUL_STEPS = 8
EVENT_STREAM = "GET /admin/v1/events/stream"
STRIPE_ROUTES = (r"^/admin/v1/(tenants/\{tenant_id\}/billing/(customer|exports/settle)"
                 r"|billing/setup)$")
SETTLE = "POST /admin/v1/tenants/{tenant_id}/billing/exports/settle"
USAGE = "GET /admin/v1/usage"

ALL_CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    use_after_free,
    ensure_resource_availability,
    ignored_auth,
    object_level_authorization,
]


def _config() -> schemathesis.Config:
    # What a case sends depends on the seed only, never on earlier answers.
    no_server_ids = {"extra-data-sources": {"responses": False}}
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "auth": {"openapi": {"adminToken": {"api_key": TOKEN}}},
        "workers": 1,
        # Reproducers show what was sent (a `*_token` field too), all but the admin token.
        "output": {"sanitization": {"keys-to-sanitize": ["x-admin-token"],
                                    "sensitive-markers": ["x-admin-token"]}},
        "request-timeout": 10,
        "generation": {"deterministic": True, "database": "none", "max-examples": EXAMPLES},
        "phases": {
            "examples": {"enabled": True, **no_server_ids},
            "coverage": {"enabled": True, **no_server_ids},
            "fuzzing": {"enabled": True, "error-feedback": {"enabled": False}, **no_server_ids},
            "stateful": {"enabled": True, "max-steps": STATEFUL_STEPS},
        },
        "operations": [
            # An event stream does not end: read it for 0.3 s (or up to one event).
            {"include-name": EVENT_STREAM, "request-timeout": 0.3, "max-stream-events": 1},
            # The service runs without Stripe here: the Stripe routes answer their documented
            # 503 ("Stripe is not configured"), which is this configuration's right answer.
            {"include-path-regex": STRIPE_ROUTES,
             "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}}},
        ],
    })


# The checked-in document (a unit test keeps it equal to the one the service serves): the
# tests are made from it when the module is collected, before any service runs, and each call
# is given the running service's address. (`schemathesis.pytest.from_fixture`, which would load
# it from the service, fails on pytest 9.2: it sets `Node._nodeid`, which pytest no longer has.)
schema = schemathesis.openapi.from_path(CHECKED_IN, config=_config())


def test_all_checks_means_every_check_schemathesis_has() -> None:
    """A Schemathesis upgrade that adds a check must not leave it out of ALL_CHECKS."""
    load_all_checks()
    assert {c.__name__ for c in ALL_CHECKS} == set(CHECKS.get_all_names())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def _ensure_streams(servers: Servers) -> None:
    """The JetStream streams the service waits for at start-up (`crosslogic nats setup`)."""
    bus = await servers.admin_bus("schemathesis-setup")
    try:
        await bus.ensure_streams()
    finally:
        await bus.close()


@pytest.fixture(scope="module")
def admin_url(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m services.admin` on a free port; it dies with the test process
    (PR_SET_PDEATHSIG) and is stopped at the end of the module. Its log: admin.log in the
    fixture's temporary folder."""
    asyncio.run(_ensure_streams(servers))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": servers.database_url, "REDIS_URL": servers.redis_url,
           "NATS_URL": servers.nats_url, "NATS_CREDS": servers.creds(Role.ADMIN_API),
           "ADMIN_TOKEN": TOKEN, "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
           "DB_MIN_CONNECTIONS": "1", "LOG_JSON": "false", "LOG_LEVEL": "warning",
           "EVENT_POLL_INTERVAL": "0.5",
           # A quiet event stream still sends a comment every 50 ms: a call to it ends on its
           # timeout, not on a read that waits for the next byte.
           "EVENT_STREAM_KEEPALIVE": "0.05"}
    for name in ("ADMIN_API_TOKEN", "STRIPE_SECRET_KEY", "STRIPE_API_BASE"):
        env.pop(name, None)
    log = tmp_path_factory.mktemp("admin") / "admin.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.admin"], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while _status(f"{url}/ready") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"admin did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------ rules JSON Schema cannot state

DOCUMENT: dict[str, Any] = json.loads(CHECKED_IN.read_text())
FUTURE_MARGIN = timedelta(days=1)
"""An `expires_at` sent is at least this far ahead: still in the future when it arrives."""
WINDOW_MARGIN = timedelta(hours=1)
"""A usage window is kept this far inside its rules: "ago" is measured again by the
server, a moment later."""
_YEAR = re.compile(r"^[0-9]{4}-")


def _resolved(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        found: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def _branches(schema: Any) -> list[dict[str, Any]]:
    """The schema and those of its anyOf/oneOf/allOf branches, resolved."""
    schema = _resolved(schema)
    if not isinstance(schema, dict):
        return []
    found = [schema]
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(key, ()):
            found.extend(_branches(branch))
    return found


def _whole_numbers_as_ints(value: Any, schema: Any) -> Any:
    """`value` with every whole float where the document says `type: integer` made an int.

    DECISION (docs/admin-api.md, "Bounded input"; each integer field's description): the
    server refuses 16.0 for an integer field with a 400, as OpenAI's API does, although JSON
    Schema counts 16.0 as an integer. A conforming client sends 16; so does this test."""
    branches = _branches(schema)
    if isinstance(value, float) and value.is_integer() and any(
            b.get("type") == "integer" for b in branches) and not any(
            b.get("type") == "number" or "number" in (b.get("type") or ()) for b in branches):
        return int(value)
    if isinstance(value, dict):
        properties: dict[str, Any] = {}
        for branch in branches:
            for name, sub in branch.get("properties", {}).items():
                properties.setdefault(name, sub)
        return {k: _whole_numbers_as_ints(v, properties[k]) if k in properties else v
                for k, v in value.items()}
    if isinstance(value, list):
        items = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        return [_whole_numbers_as_ints(v, items[0]) if items else v for v in value]
    return value


def _in_the_future(value: Any, now: datetime) -> Any:
    """A past `expires_at` moved forward by whole 400-year cycles of the calendar (the same
    day of the year, time and offset), or back when it is past year 9999 in UTC.

    DECISION (the field's description): an expiry must be in the future when sent, or the
    server answers 400; JSON Schema cannot say "after now"."""
    if not isinstance(value, str) or not _YEAR.match(value):
        return value
    year = int(value[:4])
    for cycles in (0, 1, 2, 3, 4, 5, 6, 7, -1, -2):
        text = f"{year + 400 * cycles:04d}{value[4:]}"
        try:  # as the server reads it
            when = msgspec.json.decode(msgspec.json.encode(text), type=datetime)
            utc = when.astimezone(UTC)
        except (msgspec.ValidationError, OverflowError, ValueError):
            continue
        if when.tzinfo is not None and utc > now + FUTURE_MARGIN:
            return text
    return value


def _ordered_node_counts(body: dict[str, Any]) -> dict[str, Any]:
    """`min_nodes` ≤ `max_nodes` when both are sent.

    DECISION (both fields' descriptions): `max_nodes` below `min_nodes` is a 400; JSON Schema
    cannot compare two fields."""
    low, high = body.get("min_nodes"), body.get("max_nodes")
    if type(low) is int and type(high) is int and low > high:
        return {**body, "min_nodes": high, "max_nodes": low}
    return body


def _usage_window(query: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A usage window within its rules: `end` after `start`, at most 366 days apart, both
    between 0001-01-02 and 9999-12-30 (defaults: `start` 7 days ago, `end` now). A window
    outside them is sent as the nearest one inside, in ISO-8601 times: `end` clamped, `start`
    kept when it can be, else a day (or, for a window too long, 365 days) before `end`.

    DECISION (the parameters' descriptions): the server answers 400 to another window; JSON
    Schema cannot compare two parameters. A value that is not a time at all is left as it
    is (and refused on its own account)."""
    given = {name: query[name] for name in ("start", "end") if name in query}
    if not all(isinstance(v, str) for v in given.values()):
        return query
    try:
        start = parse_since(given["start"], now) if "start" in given else now - timedelta(days=7)
        end = parse_since(given["end"], now) if "end" in given else now
    except ValueError:
        return query
    if start >= EARLIEST and end <= LATEST and \
            WINDOW_MARGIN <= end - start <= MAX_SPAN - WINDOW_MARGIN:
        return query
    end = min(max(end, EARLIEST + MAX_SPAN), LATEST)
    if not end - (MAX_SPAN - WINDOW_MARGIN) <= start <= end - WINDOW_MARGIN:
        start = end - (timedelta(days=1) if start >= end else MAX_SPAN - timedelta(days=1))
    return {**query, "start": start.astimezone(UTC).isoformat(),
            "end": end.astimezone(UTC).isoformat()}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _within_documented_rules(case: Case) -> None:
    """The hook every case goes through before its call (`test_operation`, and the state
    machine's `before_call`): a Schemathesis `before_call` hook for this module only
    (`@schemathesis.hook` would register it for every schema in the process, and a schema's
    own hooks do not include `before_call`). Assigning the parts makes Schemathesis check
    the case again as it is sent."""
    now = datetime.now(UTC)
    label = f"{case.method.upper()} {case.path}"
    if label == USAGE and isinstance(case.query, dict):
        query = _usage_window(case.query, now)
        if query != case.query:
            case.query = query
    # (The coverage phase also sends methods a path does not have: no body rules for those.)
    operation = DOCUMENT["paths"].get(case.path, {}).get(case.method.lower(), {})
    request_body = operation.get("requestBody")
    if request_body is None or not isinstance(case.body, dict):
        return
    body = _whole_numbers_as_ints(case.body,
                                  request_body["content"]["application/json"]["schema"])
    if "expires_at" in body:
        body = {**body, "expires_at": _in_the_future(body["expires_at"], now)}
    body = _ordered_node_counts(body)
    if _json(body) != _json(case.body):  # (16 == 16.0 in Python: compare as sent)
        case.body = body


BUDGET_READS = {f"{method} /admin/v1/{path}/budget" for method in ("GET", "DELETE")
                for path in ("tenants/{tenant_id}", "environments/{environment_id}",
                             "keys/{key_id}")}


def _checks(case: Case) -> dict[str, Any]:
    """Every check, but `ensure_resource_availability` on the settle route and on reading or
    clearing a budget.

    DECISION: `POST /tenants/{id}/billing/exports/settle` answers 404 for an unknown meter
    export `identifier` (`Meter export '0' not found`, as documented), which is right: the
    identifier names an export, not the tenant. The check reads a 404 from an operation
    reached by a link from `POST /tenants` as "the tenant just created is missing"; these
    tests hold no meter export, so a stateful step that settles one under a new tenant would
    be reported although the service is right. The check is left out for this one operation
    (and only it); every other check still runs on it, and the route's 404 for an unknown
    tenant is tested in tests/integration/test_billing_admin.py.

    DECISION: the same for a budget (`GET`/`DELETE /tenants/{id}/budget`, and of an
    environment or a key): a tenant just made has none, so its budget is a 404 ("budget of
    tenant … not found"), while an unknown tenant is a 404 naming the tenant
    (tests/integration/test_admin_budgets.py)."""
    operation = f"{case.method.upper()} {case.path}"
    excluded = [ensure_resource_availability] \
        if operation == SETTLE or operation in BUDGET_READS else []
    return {"checks": ALL_CHECKS, "excluded_checks": excluded}


# --------------------------------------------------------------- examples, coverage, fuzzing


@pytest.mark.usefixtures("database_url", "redis_url")  # empty tables for each operation
@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_operation(case: Case, admin_url: str) -> None:
    _within_documented_rules(case)
    case.call_and_validate(base_url=admin_url, **_checks(case))


# --------------------------------------------------------------------------------- stateful


class AdminStateMachine(schema.as_state_machine()):  # type: ignore[misc]
    base_url: ClassVar[str | None] = None
    database_url: ClassVar[str | None] = None
    """The running service's, and its database's; set by the `stateful_admin` fixture."""

    def setup(self) -> None:
        # Each scenario starts from empty tables: it sees only what it made, so the same seed
        # makes the same calls and gets the same answers.
        assert AdminStateMachine.database_url is not None
        asyncio.run(_truncate_all(AdminStateMachine.database_url))

    def before_call(self, case: Case) -> None:
        _within_documented_rules(case)

    def get_call_kwargs(self, case: Case) -> dict[str, Any]:
        return {"base_url": AdminStateMachine.base_url}

    def validate_response(self, response: Response, case: Case,
                          additional_checks: list[CheckFunction] | None = None,
                          **kwargs: Any) -> None:
        case.validate_response(response, additional_checks=additional_checks,
                               transport_kwargs=kwargs or None, recorder=self.recorder,
                               **_checks(case))


@pytest.fixture
def stateful_admin(admin_url: str, database_url: str, redis_url: str) -> Iterator[None]:
    AdminStateMachine.base_url, AdminStateMachine.database_url = admin_url, database_url
    yield
    AdminStateMachine.base_url = AdminStateMachine.database_url = None


@pytest.mark.usefixtures("stateful_admin")
class TestStateful(AdminStateMachine.TestCase):  # type: ignore[misc,name-defined]
    """Scenarios of calls chained along the inferred links: create a tenant, then read,
    patch, suspend it; an environment under it, a key under that; ..."""

    settings = hypothesis.settings(
        max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS,
        derandomize=True, deadline=None, database=None,
        suppress_health_check=list(hypothesis.HealthCheck))
