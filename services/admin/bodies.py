"""The admin API's request and response bodies, as msgspec Structs: the handlers decode and
encode with them, and the OpenAPI document is generated from them, so the two cannot drift.

Request bodies forbid unknown fields (a typo is a 400, not a silently ignored change). PATCH
bodies use `UNSET` for "leave as is": a field that is absent keeps its value; inside `quota`
and `limits` an explicit ``null`` clears that one limit.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from services.domain.catalog.bodies import (
    INT32_MAX,
    WHOLE_NUMBER,
    AwareTime,
    Body,
    Concurrency,
    FutureTime,
    Name,
    OptionalName,
    Region,
    Requests,
    Role,
    Tokens,
)
from services.domain.catalog.queries import (
    DeploymentRecord,
    ModelRecord,
    TenantRecord,
)
from services.domain.catalog.weights import JSON_SCHEMA as WEIGHTS_SCHEMA
from services.domain.catalog.weights import MAX_LENGTH
from services.infra.page import Page
from services.infra.request_checks import NO_NUL, PRICE_LIMIT, PRICE_PLACES, WHITE_SPACE_CLASS

# No white space as Python's `re` counts it: the document's pattern names the characters,
# since JSON Schema's `\s` is another set.
_ADDRESS_PART = rf"[^@\x00{WHITE_SPACE_CLASS}]+"
Email = Annotated[str, Meta(max_length=320, pattern=f"^$|^{_ADDRESS_PART}@{_ADDRESS_PART}$",
                            description="empty, or an e-mail address")]
Regions = Annotated[list[Region], Meta(min_length=1, max_length=64,
                                       extra_json_schema={"uniqueItems": True})]
GpuType = Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_NUL, examples=["A10G"])]
MinNodes = Annotated[int, Meta(
    ge=0, le=10_000, description=f"at most max_nodes (400 otherwise); {WHOLE_NUMBER}")]
MaxNodes = Annotated[int, Meta(
    ge=0, le=10_000, description=f"at least min_nodes (400 otherwise); {WHOLE_NUMBER}")]
VramGb = Annotated[int, Meta(ge=1, le=100_000, description=WHOLE_NUMBER)]
ContextLength = Annotated[int, Meta(ge=1, le=INT32_MAX, description=WHOLE_NUMBER)]
PRICE_PATTERN = rf"^(0|[1-9][0-9]{{0,13}})(\.[0-9]{{1,{PRICE_PLACES}}})?$"
Price = Annotated[Decimal, Meta(
    description="USD per million tokens: a decimal string (\"0.15\") or a JSON number, at "
                f"least 0, below {PRICE_LIMIT:,}, at most {PRICE_PLACES} decimal places; "
                "returned as a string",
    # What check_price takes. A JSON number must be a multiple of 0.000001 as written
    # (1.5, not 1.0000001): the API reads the digits sent, never a binary float.
    # `x-type` replaces msgspec's `type` (services/admin/openapi.py): string or number.
    extra_json_schema={"x-type": ["string", "number"], "pattern": PRICE_PATTERN,
                       "minimum": 0, "exclusiveMaximum": int(PRICE_LIMIT),
                       "multipleOf": float(Decimal(1).scaleb(-PRICE_PLACES))})]
WeightsSource = Annotated[str, Meta(
    # services/domain/catalog/weights.py judges a source, and its JSON_SCHEMA (the document's
    # `pattern` and `not`) states exactly that rule. Not msgspec's `pattern=`: it would
    # replace the document's.
    min_length=1, max_length=MAX_LENGTH, extra_json_schema=WEIGHTS_SCHEMA,
    examples=["r2://crosslogic-models/llama-3.1-8b-instruct"],
    description="Where the node loads the weights from: hf://<org>/<repo> (Hugging Face Hub), "
                "r2://<bucket>/<prefix> (Cloudflare R2, copied onto the node) or "
                "file:///<absolute path> (a directory on the machine: the local cloud only; "
                "the SkyPilot launcher refuses it). vLLM serves them under the model's name. "
                "A Hub repo id's parts are 1 to 96 letters, digits, '_', '.' or '-', "
                "starting and ending with a letter, digit or '_', without '--'; an R2 bucket "
                "is 3 to 63 lowercase letters, digits or '-' (not xn--…, sthree-…, "
                "…-s3alias, …--ol-s3); a prefix or path is '/'-separated names of letters, "
                "digits, '_', '.' and '-' (not '.' alone). No '..'; see docs/orchestrator.md")]
EnvironmentStatus = Literal["active", "suspended"]
ModelStatus = Literal["active", "suspended", "deleted"]


# --------------------------------------------------------------------------- tenants


class TenantCreate(Body, frozen=True, kw_only=True):
    name: Name
    email: Email = ""


class TenantPatch(Body, frozen=True, kw_only=True):
    name: Name | UnsetType = UNSET
    email: Email | UnsetType = UNSET


# --------------------------------------------------------------------------- environments


class QuotaPatch(Body, frozen=True, kw_only=True):
    requests_per_minute: Requests | UnsetType | None = UNSET
    tokens_per_minute: Tokens | UnsetType | None = UNSET
    tokens_per_day: Tokens | UnsetType | None = UNSET


class EnvironmentPatch(Body, frozen=True, kw_only=True):
    name: Name | UnsetType = UNSET
    region: Region | UnsetType = UNSET
    quota: QuotaPatch | UnsetType = UNSET
    status: EnvironmentStatus | UnsetType = UNSET


# --------------------------------------------------------------------------- API keys


class LimitsPatch(Body, frozen=True, kw_only=True):
    requests_per_minute: Requests | UnsetType | None = UNSET
    tokens_per_minute: Tokens | UnsetType | None = UNSET
    tokens_per_day: Tokens | UnsetType | None = UNSET
    concurrency: Concurrency | UnsetType | None = UNSET


class KeyPatch(Body, frozen=True, kw_only=True):
    """`expires_at` can be set or moved, not removed (the event keeps the old value when it
    carries none): rotate the key to drop an expiry."""

    name: OptionalName | UnsetType = UNSET
    role: Role | UnsetType = UNSET
    limits: LimitsPatch | UnsetType = UNSET
    expires_at: FutureTime | UnsetType = UNSET


# --------------------------------------------------------------------------- models


class ModelCreate(Body, frozen=True, kw_only=True):
    name: Name
    family: Name
    vram_gb: VramGb
    input_price_per_million: Price
    output_price_per_million: Price
    context_length: ContextLength
    weights_source: WeightsSource | None = None
    """null: the Hugging Face Hub repo of the model's name."""


class ModelPatch(Body, frozen=True, kw_only=True):
    family: Name | UnsetType = UNSET
    vram_gb: VramGb | UnsetType = UNSET
    input_price_per_million: Price | UnsetType = UNSET
    output_price_per_million: Price | UnsetType = UNSET
    context_length: ContextLength | UnsetType = UNSET
    status: ModelStatus | UnsetType = UNSET
    weights_source: WeightsSource | UnsetType = UNSET
    """Changed, not removed: set hf://<org>/<repo> to go back to the Hub. Nodes already up
    keep what they loaded; the next launch uses the new source."""


# --------------------------------------------------------------------------- deployments


class DeploymentCreate(Body, frozen=True, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL,
                               description="the model's name or id; it must be in the catalog")]
    regions: Regions
    gpu_type: GpuType
    spot: bool
    min_nodes: MinNodes
    max_nodes: MaxNodes
    allow_on_demand_fallback: bool = True


class DeploymentPatch(Body, frozen=True, kw_only=True):
    regions: Regions | UnsetType = UNSET
    gpu_type: GpuType | UnsetType = UNSET
    spot: bool | UnsetType = UNSET
    min_nodes: MinNodes | UnsetType = UNSET
    """With the one sent, or the deployment's: min_nodes ≤ max_nodes."""
    max_nodes: MaxNodes | UnsetType = UNSET
    allow_on_demand_fallback: bool | UnsetType = UNSET


# --------------------------------------------------------------------------- billing

ExportIdentifier = Annotated[str, Meta(
    min_length=1, max_length=100, pattern=NO_NUL,
    description="a meter export's `identifier`: the Stripe meter event identifier, "
                "`<tenant>:<meter>:<YYYY-MM-DDTHH>[:<sequence>]`")]


class ExportSettle(Body, frozen=True, kw_only=True):
    identifier: ExportIdentifier
    action: Annotated[Literal["resend", "mark_exported"], Meta(
        description="`resend`: Stripe does not have the identifier, so send the meter event "
                    "now (stamped with the time of sending); `mark_exported`: Stripe has it, "
                    "so record it as exported without sending")]


class BillingSetup(Body, frozen=True, kw_only=True):
    switch: Annotated[bool, Meta(
        description="Move the linked tenants still on the token prices to the cost price "
                    "(the default); false: only make or check the meter and price")] = True
    tenant_id: Annotated[uuid.UUID | None, Meta(
        description="Move only this tenant")] = None
    switch_at: Annotated[AwareTime | None, Meta(
        description="When to bill by cost from (the start of the tenants' next billing "
                    "period, say): the whole UTC hour at or after it, and for each tenant not "
                    "before the earliest allowed, which is also the default: the next hour, "
                    "and after the last hour already billed on the token meters. Each "
                    "tenant's answer says the hour it got")] = None


# --------------------------------------------------------------------------- lists


class TenantList(Page[TenantRecord], kw_only=True, frozen=True):
    pass


class ModelList(Page[ModelRecord], kw_only=True, frozen=True):
    pass


class DeploymentList(Page[DeploymentRecord], kw_only=True, frozen=True):
    pass


# --------------------------------------------------------------------------- events


class LoggedEvent(msgspec.Struct, kw_only=True, frozen=True):
    """An event as the log holds it (the same object `crosslogic events tail --json` prints)."""

    position: int
    stream_version: int
    recorded_at: AwareTime
    origin: Literal["log", "bus"]
    event: Annotated[dict[str, Any], Meta(
        description="the event as on NATS: `type`, `id`, `stream`, `occurred_at`, `metadata` "
                    "and its payload (schemas/jsonschema/events.json)")]


class EventList(Page[LoggedEvent], kw_only=True, frozen=True):
    pass


class EventTypeStat(msgspec.Struct, kw_only=True, frozen=True):
    type: str
    events: int
    last_position: int
    last_recorded_at: AwareTime


class EventStats(msgspec.Struct, kw_only=True, frozen=True):
    data: list[EventTypeStat]


# --------------------------------------------------------------------------- errors


class ErrorDetail(msgspec.Struct, kw_only=True, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, kw_only=True, frozen=True):
    """OpenAI's error shape, as every CrossLogic API answers errors."""

    error: ErrorDetail
