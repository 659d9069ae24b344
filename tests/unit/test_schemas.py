"""The event contract: one decoder for every type, derived streams and subjects, JSON Schema."""

from __future__ import annotations

import enum
import typing
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest

from schemas import export
from schemas.events import (
    EVENT_TYPES,
    ApiKeyRevoked,
    EventDecodeError,
    ModelCreated,
    NodeHeartbeat,
    NotificationEndpointDisabled,
    UsageRecorded,
    decode_event,
    encode_event,
    payload_of,
    subject_for,
)
from schemas.ids import uuid7, uuid7_ms
from schemas.subjects import STREAMS, dlq_subject, stream_for_subject
from tests.helpers import node_registered

_SAMPLES: dict[object, object] = {
    uuid.UUID: uuid.UUID("0193a1b2-0000-7000-8000-000000000001"), str: "x", int: 1, bool: True,
    float: 1.5, datetime: datetime(2026, 1, 1, tzinfo=UTC), Decimal: Decimal("0.15"),
}


def sample(tp: object) -> object:
    """A valid value of a field type, including lists, optionals and enums."""
    if tp in _SAMPLES:
        return _SAMPLES[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return next(iter(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return [sample(args[0])]
    if args:
        return sample(args[0])
    raise AssertionError(f"no sample for {tp!r}")


def example(cls: type) -> object:
    """A minimal valid instance of any event class, built from its fields' types."""
    values = {f.name: sample(f.type) for f in msgspec.structs.fields(cls) if f.required}
    return msgspec.convert(msgspec.to_builtins(values), cls)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_event_round_trips_through_the_one_decoder(event_type: str) -> None:
    event = example(EVENT_TYPES[event_type])
    decoded = decode_event(encode_event(event))  # type: ignore[arg-type]
    assert type(decoded) is EVENT_TYPES[event_type]
    assert decoded == event
    assert decoded.type == event_type
    assert decoded.subject.startswith(event_type + ".")
    # Every type has exactly one JetStream stream to live in.
    assert stream_for_subject(decoded.subject) is not None
    owners = [s.name for s in STREAMS
              if stream_for_subject(decoded.subject) is s]
    assert len(owners) == 1
    # The relay's subject (from stored parts) equals the event's own.
    assert subject_for(event_type, decoded.stream, msgspec.to_builtins(payload_of(decoded))) == \
        decoded.subject


def test_streams_and_subjects_are_derived_from_the_payload() -> None:
    n = node_registered()
    assert n.stream == f"node:{n.node_id}"
    assert n.subject == f"node.registered.{n.node_id}"
    tenant = uuid.uuid4()
    usage = UsageRecorded(request_id="r1", tenant_id=tenant, environment_id=uuid.uuid4(),
                          api_key_id=uuid.uuid4(), model="m", endpoint="chat", region="eu",
                          node_id=None, prompt_tokens=3, completion_tokens=4, latency_ms=12.0)
    assert usage.subject == f"usage.recorded.{tenant}"
    revoked = ApiKeyRevoked(key_id=uuid.uuid4(), tenant_id=tenant, key_hash="ab")
    assert revoked.stream == f"apikey:{revoked.key_id}"
    assert revoked.subject == f"apikey.revoked.{tenant}"  # routed by tenant
    platform = NotificationEndpointDisabled(subscription_id=uuid.uuid4(), reason="404")
    assert platform.subject == "notification.endpoint_disabled.platform"
    assert stream_for_subject("dlq.x.node.registered.1").name == "DLQ"  # type: ignore[union-attr]
    assert dlq_subject("billing", "usage.recorded.t") == "dlq.billing.usage.recorded.t"
    assert stream_for_subject("nothing.here") is None


def test_an_explicit_stream_is_kept() -> None:
    hb = NodeHeartbeat(node_id=uuid.uuid4(), sequence=1, health_score=50, vllm_healthy=False,
                       stream="custom:1")
    assert hb.stream == "custom:1"


def test_decoding_errors_are_clear() -> None:
    with pytest.raises(EventDecodeError, match="not JSON"):
        decode_event(b"{nope")
    with pytest.raises(EventDecodeError, match="type"):
        decode_event(b'{"type": "node.unknown", "node_id": "x"}')
    good = msgspec.json.decode(encode_event(node_registered()))
    del good["vram_total_gb"]
    with pytest.raises(EventDecodeError, match="vram_total_gb"):
        decode_event(msgspec.json.encode(good))
    good = msgspec.json.decode(encode_event(node_registered()))
    good["node_id"] = "not-a-uuid"
    with pytest.raises(EventDecodeError, match="node_id"):
        decode_event(msgspec.json.encode(good))


def test_prices_are_decimals_on_the_wire() -> None:
    m = ModelCreated(model_id=uuid.uuid4(), name="llama", family="llama", vram_gb=16,
                     input_price_per_million=Decimal("0.10"),
                     output_price_per_million=Decimal("0.2"), context_length=8192)
    raw = msgspec.json.decode(encode_event(m))
    assert raw["input_price_per_million"] == "0.10"  # a string, never a float
    assert decode_event(encode_event(m)).input_price_per_million == Decimal("0.10")  # type: ignore[attr-defined]


def test_payload_leaves_out_the_envelope() -> None:
    n = node_registered()
    payload = payload_of(n)
    assert "id" not in payload and "type" not in payload and "stream" not in payload
    assert payload["node_id"] == str(n.node_id)


def test_uuid7_is_time_ordered_and_versioned() -> None:
    ids = [uuid7(1_700_000_000_000 + i) for i in range(100)]
    assert ids == sorted(ids)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert uuid7_ms(ids[5]) == 1_700_000_000_005
    assert len({uuid7() for _ in range(1000)}) == 1000


def test_json_schema_export_is_current() -> None:
    stale = export.stale()
    assert stale == [], f"schemas/jsonschema is stale ({stale}): run `make schemas`"


def test_json_schema_names_every_event_type() -> None:
    index = msgspec.json.decode(export.render()["index.json"])
    assert set(index) == set(EVENT_TYPES)
