"""Every fact of the platform, as an event: the contract between services, the log and NATS.

An event is a msgspec Struct tagged by its `type` (``node.registered``, ``usage.recorded``, …),
so one decoder (`decode_event` / `AnyEvent`) reads any of them. The envelope (`id`, `stream`,
`occurred_at`, `metadata`) is the same for all; the rest is the typed payload.

- `id` is a UUIDv7: unique, time-ordered; the log and NATS (`Nats-Msg-Id`) deduplicate on it.
- `stream` is the aggregate the event belongs to (``node:<uuid>``, ``tenant:<uuid>``), derived
  from the payload when not given; the log versions each stream for optimistic concurrency.
- `subject` is the NATS subject: the type plus a routing token (``node.heartbeat.<node_id>``).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

import msgspec

from schemas.ids import uuid7


def utcnow() -> datetime:
    return datetime.now(UTC)


PLATFORM = "platform"
"""Routing token for events that belong to no tenant (platform-wide subscriptions)."""


class EventMetadata(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Why an event happened: the request or event that caused it and who did it."""

    correlation_id: str | None = None
    causation_id: str | None = None
    actor: str | None = None


class Event(msgspec.Struct, kw_only=True, tag_field="type"):
    """The envelope shared by every event. Subclasses set `tag` and the ClassVars below."""

    aggregate: ClassVar[str]
    """Prefix of the stream name: ``node`` gives streams ``node:<id>``."""
    stream_field: ClassVar[str]
    """Payload field whose value names the stream."""
    subject_field: ClassVar[str | None] = None
    """Payload field used as the subject's routing token (default: `stream_field`)."""

    id: uuid.UUID = msgspec.field(default_factory=uuid7)
    stream: str = ""
    occurred_at: datetime = msgspec.field(default_factory=utcnow)
    metadata: EventMetadata = msgspec.field(default_factory=EventMetadata)

    def __post_init__(self) -> None:
        if not self.stream:
            self.stream = f"{self.aggregate}:{getattr(self, self.stream_field)}"

    @property
    def type(self) -> str:
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag

    @property
    def routing_token(self) -> str:
        value = getattr(self, self.subject_field or self.stream_field)
        return PLATFORM if value is None else str(value)

    @property
    def subject(self) -> str:
        return f"{self.type}.{self.routing_token}"


# --------------------------------------------------------------------------- shared payload types


class NodeStatus(enum.StrEnum):
    LAUNCHING = "launching"
    REGISTERED = "registered"
    ACTIVE = "active"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    TERMINATED = "terminated"
    STALE = "stale"
    FAILED = "failed"


class EntityStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DELETED = "deleted"


class Quota(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Limits of an environment or an API key; None means the level's default."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrency: int | None = None


# --------------------------------------------------------------------------- nodes


class _NodeEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "node"
    stream_field: ClassVar[str] = "node_id"

    node_id: uuid.UUID


class NodeRegistered(_NodeEvent, tag="node.registered"):
    """An agent announced its node (the reference document's registration payload)."""

    cluster_name: str
    provider: str
    region: str
    instance_type: str
    gpu_type: str
    vram_total_gb: int
    model_name: str
    endpoint_url: str
    spot_instance: bool
    agent_version: str = ""


class NodeAccepted(_NodeEvent, tag="node.accepted"):
    """The monitor accepted registration `registration_id`: the node was launched by the
    orchestrator, is still live, and says what its launch said. Gateways route only to nodes
    they learned of from this event, at this `endpoint_url` (a raw ``node.registered`` is only
    the agent's word). Appended with the registration, in the same transaction."""

    registration_id: uuid.UUID
    endpoint_url: str
    model_name: str
    region: str


class NodeHeartbeat(_NodeEvent, tag="node.heartbeat"):
    """An observation, not a state change: the latest one lives in Redis."""

    sequence: int
    health_score: int
    vllm_healthy: bool
    model_name: str = ""
    num_requests_running: float | None = None
    num_requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    """Fraction 0..1 of the KV cache in use (vLLM's `vllm:kv_cache_usage_perc`)."""
    tokens_per_second: float | None = None
    gpu_utilization: float | None = None
    """Percent 0..100 from nvidia-smi, when the node has it."""
    draining: bool = False


class NodeSpotWarning(_NodeEvent, tag="node.spot_warning"):
    """The cloud will reclaim this spot instance: drain now, replace at once."""

    provider: str
    action: str
    deadline: datetime | None = None


class NodeStatusChanged(_NodeEvent, tag="node.status_changed"):
    from_status: NodeStatus | None
    to_status: NodeStatus
    reason: str = ""
    health_score: int | None = None


class NodeDraining(_NodeEvent, tag="node.draining"):
    reason: str
    deadline: datetime | None = None


class NodeDeregistered(_NodeEvent, tag="node.deregistered"):
    """The agent left cleanly after draining."""

    reason: str = ""


class NodeTerminated(_NodeEvent, tag="node.terminated"):
    reason: str
    cluster_name: str = ""


class NodeLaunching(_NodeEvent, tag="node.launching"):
    """The orchestrator asked the cloud for a node (recorded before it asks, so a new leader
    after a failover sees the launch and does not launch again)."""

    deployment_id: uuid.UUID | None
    cluster_name: str
    model_name: str
    provider: str
    region: str
    gpu_type: str
    spot: bool
    deadline: datetime
    """Registration expected by then, or the launch has failed."""
    credential_key: str = ""
    """The public key (``U…``) of the NATS credential minted for this node: revoked when the
    node ends. Empty for launches from before per-node credentials."""
    credential_expires_at: datetime | None = None


class NodeTerminateRequested(_NodeEvent, tag="node.terminate_requested"):
    """An operator (or the orchestrator's own decision) wants the node gone."""

    reason: str


class NodeReplaced(_NodeEvent, tag="node.replaced"):
    """A replacement was launched for this node (spot notice, stale, failed, unhealthy)."""

    replacement_id: uuid.UUID
    reason: str
    deployment_id: uuid.UUID | None = None


# --------------------------------------------------------------------------- usage


class UsagePrice(msgspec.Struct, kw_only=True, frozen=True):
    """The price billing applied when it recorded a usage event (prices per 1M tokens)."""

    input_price_per_million: Decimal
    output_price_per_million: Decimal
    region_multiplier: Decimal
    cost: Decimal


class UsageRecorded(Event, tag="usage.recorded"):
    """One inference request, as metered by the gateway from vLLM's `usage`. The gateway
    publishes it without `price`; billing records it with the price it applied, so replaying
    the log never re-prices old usage."""

    aggregate: ClassVar[str] = "usage"
    stream_field: ClassVar[str] = "tenant_id"

    request_id: str
    tenant_id: uuid.UUID
    environment_id: uuid.UUID
    api_key_id: uuid.UUID
    model: str
    endpoint: str
    region: str
    node_id: uuid.UUID | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    time_to_first_token_ms: float | None = None
    status: int = 200
    streamed: bool = False
    price: UsagePrice | None = None
    resumed: int = 0
    """How many times the request went on on another node after its node failed (the
    tokens are counted once: the original prompt and what the client received)."""


# --------------------------------------------------------------------------- tenants


class _TenantEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "tenant"
    stream_field: ClassVar[str] = "tenant_id"

    tenant_id: uuid.UUID


class TenantCreated(_TenantEvent, tag="tenant.created"):
    name: str
    email: str = ""
    status: EntityStatus = EntityStatus.ACTIVE


class TenantUpdated(_TenantEvent, tag="tenant.updated"):
    """Only the fields that changed are set."""

    name: str | None = None
    email: str | None = None


class TenantSuspended(_TenantEvent, tag="tenant.suspended"):
    reason: str = ""


class TenantReactivated(_TenantEvent, tag="tenant.reactivated"):
    reason: str = ""


# --------------------------------------------------------------------------- environments


class _EnvironmentEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "environment"
    stream_field: ClassVar[str] = "environment_id"
    subject_field: ClassVar[str | None] = "tenant_id"

    environment_id: uuid.UUID
    tenant_id: uuid.UUID


class EnvironmentCreated(_EnvironmentEvent, tag="environment.created"):
    name: str
    region: str
    quota: Quota = msgspec.field(default_factory=Quota)
    status: EntityStatus = EntityStatus.ACTIVE


class EnvironmentUpdated(_EnvironmentEvent, tag="environment.updated"):
    name: str | None = None
    region: str | None = None
    quota: Quota | None = None
    status: EntityStatus | None = None


# --------------------------------------------------------------------------- budgets


class _BudgetEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "budget"
    stream_field: ClassVar[str] = "scope_id"
    subject_field: ClassVar[str | None] = "tenant_id"

    scope: str
    """`tenant`, `environment` or `key`: what `scope_id` names."""
    scope_id: uuid.UUID
    tenant_id: uuid.UUID


class BudgetSet(_BudgetEvent, tag="budget.set"):
    """At most `amount` (dollars) spent per period by the scope: `day` (UTC), `month` (from
    the 1st, UTC) or `days` (every `every_days` days from `anchor`)."""

    amount: Decimal
    period: str
    every_days: int = 1
    anchor: datetime | None = None


class BudgetCleared(_BudgetEvent, tag="budget.cleared"):
    """The scope has no budget any more."""


class _BudgetAlert(_BudgetEvent, kw_only=True):
    """What billing's records say a budget's period has spent (services/billing/
    budget_watch.py); one stream per budget and period, so each is said once."""

    aggregate: ClassVar[str] = "budget_alert"
    stream_field: ClassVar[str] = "alert_key"

    alert_key: str
    """`<scope id>:<period start>`: names the period's stream."""
    amount: Decimal
    spent: Decimal
    period_start: datetime
    period_end: datetime


class BudgetThresholdReached(_BudgetAlert, tag="budget.threshold_reached"):
    """The period has spent `threshold` percent (50 or 80) of the budget."""

    threshold: int


class BudgetExhausted(_BudgetAlert, tag="budget.exhausted"):
    """The period has spent the whole budget: requests under it are refused until
    `period_end`."""


# --------------------------------------------------------------------------- API keys


class _ApiKeyEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "apikey"
    stream_field: ClassVar[str] = "key_id"
    subject_field: ClassVar[str | None] = "tenant_id"

    key_id: uuid.UUID
    tenant_id: uuid.UUID


class ApiKeyCreated(_ApiKeyEvent, tag="apikey.created"):
    """Only the SHA-256 of the key is ever stored or sent; `last_four` is for display."""

    environment_id: uuid.UUID
    key_hash: str
    last_four: str
    name: str = ""
    role: str = "developer"
    limits: Quota = msgspec.field(default_factory=Quota)
    expires_at: datetime | None = None


class ApiKeyUpdated(_ApiKeyEvent, tag="apikey.updated"):
    key_hash: str
    name: str | None = None
    role: str | None = None
    limits: Quota | None = None
    expires_at: datetime | None = None


class ApiKeyRevoked(_ApiKeyEvent, tag="apikey.revoked"):
    """Carries the hash so every gateway can drop it from its caches at once."""

    key_hash: str
    reason: str = ""


# --------------------------------------------------------------------------- models and deployments


class _ModelEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "model"
    stream_field: ClassVar[str] = "model_id"

    model_id: uuid.UUID


class ModelCreated(_ModelEvent, tag="model.created"):
    name: str
    family: str
    vram_gb: int
    input_price_per_million: Decimal
    output_price_per_million: Decimal
    context_length: int
    weights_source: str | None = None
    """Where the weights come from (hf://, r2://, file://: services/domain/catalog/weights.py);
    None: the Hugging Face Hub repo of the model's name."""


class ModelUpdated(_ModelEvent, tag="model.updated"):
    family: str | None = None
    vram_gb: int | None = None
    input_price_per_million: Decimal | None = None
    output_price_per_million: Decimal | None = None
    context_length: int | None = None
    status: EntityStatus | None = None
    weights_source: str | None = None
    """A new source; None: unchanged."""


class _DeploymentEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "deployment"
    stream_field: ClassVar[str] = "deployment_id"

    deployment_id: uuid.UUID


class DeploymentCreated(_DeploymentEvent, tag="deployment.created"):
    model_id: uuid.UUID
    model_name: str
    regions: list[str]
    gpu_type: str
    spot: bool
    min_nodes: int
    max_nodes: int
    allow_on_demand_fallback: bool = True


class DeploymentUpdated(_DeploymentEvent, tag="deployment.updated"):
    regions: list[str] | None = None
    gpu_type: str | None = None
    spot: bool | None = None
    min_nodes: int | None = None
    max_nodes: int | None = None
    allow_on_demand_fallback: bool | None = None


class DeploymentDeleted(_DeploymentEvent, tag="deployment.deleted"):
    reason: str = ""


class DeploymentNoActiveNodes(_DeploymentEvent, tag="deployment.no_active_nodes"):
    """A deployment that should serve has had no active node for a while (an operator alert;
    emitted once per outage)."""

    # Its own stream: an alert must not move the deployment's version, which the catalog's
    # commands expect.
    aggregate: ClassVar[str] = "deployment_alert"

    model_name: str
    since: datetime


# --------------------------------------------------------------------------- billing


class _BillingEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "billing"
    stream_field: ClassVar[str] = "tenant_id"

    tenant_id: uuid.UUID


class StripeCustomerLinked(_BillingEvent, tag="billing.customer_linked"):
    """The tenant is billed through this Stripe customer (and metered subscription).
    `cost_from`: the subscription is to the cost price, which bills the tenant's hours from
    this one on (earlier ones, if any, stay on the token prices)."""

    customer_id: str
    subscription_id: str | None = None
    cost_from: datetime | None = None


class PricingSwitched(_BillingEvent, tag="billing.pricing_switched"):
    """The tenant's subscription has the cost price now (`subscription_item_id`): its hours
    from `cost_from` on are billed by cost, earlier ones stay on the token prices."""

    cost_from: datetime
    price_id: str
    subscription_id: str
    subscription_item_id: str


class UsageExportPlanned(_BillingEvent, tag="billing.export_planned"):
    """The amount of one meter for one closed hour is fixed before it is sent to Stripe, so a
    resend after a crash carries the same value under the same `identifier`. `sequence` 0 is
    the hour's first export; later ones carry usage that arrived after it (corrections)."""

    meter: str
    event_name: str
    hour: datetime
    value: int
    identifier: str
    sequence: int
    customer_id: str


class UsageExported(_BillingEvent, tag="billing.usage_exported"):
    """One closed hour of one meter sent to Stripe as a Meter Event. `duplicate`: Stripe
    already had this identifier (a resend after a crash), so nothing more was charged."""

    meter: str
    hour: datetime
    value: int
    identifier: str
    sequence: int = 0
    customer_id: str = ""
    duplicate: bool = False


class UsageExportFailed(_BillingEvent, tag="billing.export_failed"):
    """`retryable`: the export stays planned and is sent again; otherwise it is given up and
    needs an operator (the value is not lost: it is in this event)."""

    meter: str
    hour: datetime
    identifier: str
    error: str
    retryable: bool
    value: int = 0
    ambiguous: bool = False
    """The attempt may have reached Stripe all the same (a timeout, a cut connection, a 5xx, or
    a sender that stopped before the answer): Stripe may have counted it."""


class UsageExportHeld(_BillingEvent, tag="billing.export_held"):
    """A planned export is no longer sent: an earlier attempt may have reached Stripe, and it
    was planned longer ago than Stripe's identifier uniqueness (about 24 h) can be counted on,
    so a resend could be counted twice. An operator checks Stripe for the identifier and
    settles it; the value is in this event."""

    meter: str
    hour: datetime
    identifier: str
    value: int
    planned_at: datetime
    reason: str


class UsageExportSkipped(_BillingEvent, tag="billing.export_skipped"):
    """A closed hour of a tenant without a Stripe customer: nothing sent, reported once. It is
    sent (as planned) once the tenant is linked, if the hour is still within the look-back."""

    meter: str
    hour: datetime
    value: int
    identifier: str
    reason: str
    sequence: int = 0


class InvoicePaid(_BillingEvent, tag="billing.invoice_paid"):
    invoice_id: str
    amount_paid: int
    currency: str
    stripe_event_id: str


class PaymentFailed(_BillingEvent, tag="billing.payment_failed"):
    """The tenant is flagged (billing_accounts.payment_status); `action_required`: the
    customer must authenticate the payment (invoice.payment_action_required)."""

    invoice_id: str
    amount_due: int
    currency: str
    stripe_event_id: str
    action_required: bool = False


class SubscriptionChanged(_BillingEvent, tag="billing.subscription_changed"):
    subscription_id: str
    status: str
    stripe_event_id: str


class MeterErrorReported(Event, tag="billing.meter_error_reported"):
    """Stripe found invalid meter events after accepting them (an asynchronous error report):
    usage that will not be billed unless an operator acts."""

    aggregate: ClassVar[str] = "meter"
    stream_field: ClassVar[str] = "meter_id"

    meter_id: str
    stripe_event_id: str
    summary: str = ""
    error_counts: dict[str, int] = msgspec.field(default_factory=dict)
    """Stripe's error code → how many events had it."""
    sample_identifiers: list[str] = msgspec.field(default_factory=list)
    validation_start: datetime | None = None
    validation_end: datetime | None = None


# --------------------------------------------------------------------------- notifications


class _NotificationEvent(Event, kw_only=True):
    aggregate: ClassVar[str] = "subscription"
    stream_field: ClassVar[str] = "subscription_id"
    subject_field: ClassVar[str | None] = "tenant_id"

    subscription_id: uuid.UUID
    tenant_id: uuid.UUID | None = None
    """None for a platform (operator) subscription."""


class NotificationSubscriptionCreated(_NotificationEvent, tag="notification.subscription_created"):
    """`target` is masked (``https://discord.com/api/webhooks/123/***``, ``o***@acme.test``):
    webhook URLs embed their token, so the real target and any signing secret stay in the
    notifier's secrets table and never travel in events. `kind`: discord, slack, email or
    generic; `event_types`: globs on the event type (``node.*``)."""

    kind: str
    target: str
    event_types: list[str]
    description: str = ""


class NotificationSubscriptionDeleted(_NotificationEvent, tag="notification.subscription_deleted"):
    pass


class NotificationDelivered(_NotificationEvent, tag="notification.delivered"):
    """Not emitted: successes are in the notifier's delivery log. An event per delivery would
    itself be delivered to every ``notification.*`` subscriber, and so on without end."""

    event_id: uuid.UUID
    attempts: int
    status_code: int


class NotificationDeliveryFailed(_NotificationEvent, tag="notification.delivery_failed"):
    """Every attempt of the retry schedule failed; the delivery can be replayed."""

    event_id: uuid.UUID
    attempts: int
    last_status_code: int | None
    error: str
    event_type: str = ""
    delivery_id: uuid.UUID | None = None


class NotificationEndpointDisabled(_NotificationEvent, tag="notification.endpoint_disabled"):
    """The notifier stopped using the endpoint: it answered 404 or 410 (gone for good), or
    kept failing for longer than the notifier allows. Pending deliveries are cancelled."""

    reason: str
    last_status_code: int | None = None


class AlertItem(msgspec.Struct, kw_only=True, frozen=True):
    """One alert of an Alertmanager notification (webhook payload version 4)."""

    status: str
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    generator_url: str = ""
    fingerprint: str = ""


class NotificationAlert(Event, tag="notification.alert"):
    """A Prometheus Alertmanager notification taken in by the notifier's ``POST /alertmanager``
    and fanned out to platform subscriptions: one event per notification (a group of alerts),
    as Alertmanager grouped them. A platform event: it carries no tenant."""

    aggregate: ClassVar[str] = "alertgroup"
    stream_field: ClassVar[str] = "group_id"

    group_id: str
    """The first 16 hex digits of the SHA-256 of Alertmanager's `groupKey`."""
    status: str
    """``firing`` or ``resolved``: the group's status."""
    receiver: str = ""
    group_key: str = ""
    group_labels: dict[str, str] = msgspec.field(default_factory=dict)
    common_labels: dict[str, str] = msgspec.field(default_factory=dict)
    common_annotations: dict[str, str] = msgspec.field(default_factory=dict)
    external_url: str = ""
    truncated_alerts: int = 0
    alerts: list[AlertItem] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------------- the union

AnyEvent = (
    NodeRegistered
    | NodeAccepted
    | NodeHeartbeat
    | NodeSpotWarning
    | NodeStatusChanged
    | NodeDraining
    | NodeDeregistered
    | NodeTerminated
    | NodeLaunching
    | NodeTerminateRequested
    | NodeReplaced
    | UsageRecorded
    | TenantCreated
    | TenantUpdated
    | TenantSuspended
    | TenantReactivated
    | EnvironmentCreated
    | EnvironmentUpdated
    | ApiKeyCreated
    | ApiKeyUpdated
    | ApiKeyRevoked
    | ModelCreated
    | ModelUpdated
    | DeploymentCreated
    | DeploymentUpdated
    | DeploymentDeleted
    | DeploymentNoActiveNodes
    | BudgetSet
    | BudgetCleared
    | BudgetThresholdReached
    | BudgetExhausted
    | StripeCustomerLinked
    | PricingSwitched
    | UsageExportPlanned
    | UsageExported
    | UsageExportFailed
    | UsageExportHeld
    | UsageExportSkipped
    | InvoicePaid
    | PaymentFailed
    | SubscriptionChanged
    | MeterErrorReported
    | NotificationSubscriptionCreated
    | NotificationSubscriptionDeleted
    | NotificationDelivered
    | NotificationDeliveryFailed
    | NotificationEndpointDisabled
    | NotificationAlert
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls
    for cls in AnyEvent.__args__
}

_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


class EventDecodeError(ValueError):
    """Bytes that are not a valid event of a known type."""


def decode_event(data: bytes | str) -> Event:
    """Any event from its JSON form (with `type`); EventDecodeError when it is not one."""
    try:
        event: Event = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise EventDecodeError(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"not JSON: {exc}") from exc
    return event


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def subject_for(event_type: str, stream: str, payload: dict[str, Any]) -> str:
    """The subject of an event known only by its stored parts (the outbox relay does not
    decode): the same as `Event.subject` for known types; a type this build does not know
    yet (a newer writer during a rolling deploy) is routed by its stream's id."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        return f"{event_type}.{stream.split(':', 1)[-1]}"
    value = payload.get(cls.subject_field or cls.stream_field)
    return f"{event_type}.{PLATFORM if value is None else value}"


ENVELOPE_FIELDS = frozenset({"type", "id", "stream", "occurred_at", "metadata"})


def payload_of(event: Event) -> dict[str, Any]:
    """The typed payload alone: what the log stores in `events.data`."""
    data: dict[str, Any] = msgspec.to_builtins(event)
    for name in ENVELOPE_FIELDS:
        data.pop(name, None)
    return data
