"""Messages per service, within each one's limits: Discord, Slack, e-mail, signed generic
webhooks; what events say; Alertmanager's payload."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from schemas.events import encode_event
from services.domain.notifications.targets import generate_signing_secret
from services.notifier import alertmanager, discord, generic, mail, slack
from services.notifier.messages import Field, Message, Section, Severity, describe, money
from services.notifier.text import ELLIPSIS, one_line, truncate, units
from tests.helpers import node_registered

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def event(event_type: str, **payload: Any) -> dict[str, Any]:
    return {"type": event_type, "id": str(uuid.uuid4()), "stream": "x:1",
            "occurred_at": "2026-01-01T12:00:00Z", "metadata": {}, **payload}


# --------------------------------------------------------------------------- text


def test_units_count_utf16_like_discord_and_slack() -> None:
    assert units("abc") == 3 and units("é") == 1 and units("🔥") == 2


def test_truncate_never_splits_a_character_and_marks_the_cut() -> None:
    assert truncate("hello", 5) == "hello"
    assert truncate("hello world", 8) == "hello w" + ELLIPSIS
    cut = truncate("🔥" * 10, 7)
    assert cut == "🔥🔥🔥" + ELLIPSIS and units(cut) <= 7
    assert truncate("abc", 0) == "" and truncate("abcdef", 1) == ELLIPSIS
    assert one_line(" a\n\tb  c ") == "a b c"


# --------------------------------------------------------------------------- messages


def test_known_events_read_as_sentences() -> None:
    node = str(uuid.uuid4())
    m = describe(event("node.status_changed", node_id=node, from_status="active",
                       to_status="unhealthy", reason="health score 12", health_score=12))
    assert m.headline == f"Node {node[:8]} is unhealthy"
    assert m.sections[0].text == "active → unhealthy: health score 12"
    assert m.severity is Severity.WARNING
    assert m.sections[0].timestamp == NOW
    assert describe(event("node.status_changed", node_id=node, to_status="stale")
                    ).severity is Severity.CRITICAL
    paid = describe(event("billing.payment_failed", tenant_id=str(uuid.uuid4()),
                          invoice_id="in_1", amount_due=123456, currency="usd"))
    assert paid.headline == "Payment failed: 1,234.56 USD" and paid.severity is \
        Severity.CRITICAL
    assert describe(event("deployment.no_active_nodes", model_name="llama-8b",
                          deployment_id="d", since="2026-01-01T11:00:00Z")).headline == \
        "No active nodes for llama-8b"
    assert describe(event("node.spot_warning", node_id=node, provider="aws",
                          action="terminate")).severity is Severity.WARNING
    assert describe(event("tenant.suspended", tenant_id="t", reason="unpaid")
                    ).sections[0].text == "unpaid"
    replaced = describe(event("node.replaced", node_id=node, replacement_id=node,
                              reason="spot"))
    assert replaced.headline.startswith("Node ") and "replaced by" in replaced.headline
    assert "disabled" in describe(event("notification.endpoint_disabled", reason="404",
                                        subscription_id="s")).headline


def test_billing_exports_tell_the_operator_what_to_do() -> None:
    tenant = str(uuid.uuid4())
    ident = f"{tenant}:input_tokens:2026-01-01T10"
    held = describe(event("billing.export_held", tenant_id=tenant, meter="input_tokens",
                          hour="2026-01-01T10:00:00Z", identifier=ident, value=1234567,
                          planned_at="2026-01-01T11:05:00Z",
                          reason="planned 21.0 h ago and an earlier attempt may have reached "
                                 "Stripe (500 api_error)"))
    assert held.headline == "Stripe meter event held for an operator: 1,234,567 input tokens"
    assert held.severity is Severity.WARNING
    text = held.sections[0].text
    assert f"crosslogic billing settle {tenant} {ident} --exported" in text
    assert "--resend" in text and "500 api_error" in text
    fields = {f.name: f.value for f in held.sections[0].fields}
    assert (fields["tenant"], fields["identifier"], fields["tokens"]) == (
        tenant, ident, "1,234,567 input tokens")
    assert fields["planned at"] == "2026-01-01T11:05:00Z"

    refused = describe(event("billing.export_failed", tenant_id=tenant, meter="output_tokens",
                             hour="2026-01-01T10:00:00Z", identifier=ident, value=20,
                             error="400 resource_missing No such customer", retryable=False))
    assert refused.headline == "Stripe refused a meter event: 20 output tokens not billed"
    assert refused.severity is Severity.WARNING
    assert "No such customer" in refused.sections[0].text
    assert "by hand" in refused.sections[0].text

    retrying = describe(event("billing.export_failed", tenant_id=tenant, meter="input_tokens",
                              hour="2026-01-01T10:00:00Z", identifier=ident, value=5,
                              error="500 api_error", retryable=True, ambiguous=True))
    assert retrying.headline.startswith("Stripe meter event not sent yet, retrying")
    assert retrying.severity is Severity.INFO
    assert "may have counted" in retrying.sections[0].text
    # Every service's format carries it within its limits.
    for service in (discord, slack):
        out = service.payload(held)
        assert service.check(out) == [] and ident in json.dumps(out)


def test_unknown_types_still_say_something() -> None:
    m = describe(event("orchestrator.capacity_low", region="us-east-1", free_gpus=0,
                       empty=None, nested={"a": 1}, flags=[True, False]))
    assert m.headline == "orchestrator.capacity_low"
    assert [(f.name, f.value) for f in m.sections[0].fields] == [
        ("region", "us-east-1"), ("free gpus", "0"), ("nested", "a=1"),
        ("flags", "yes, no")]
    assert m.footer.startswith("orchestrator.capacity_low · ")


def test_typed_events_describe_through_their_json() -> None:
    e = msgspec.json.decode(encode_event(node_registered()))
    m = describe(e)
    assert m.headline.endswith("registered") and m.event_id == e["id"]


def test_money() -> None:
    assert money(500, "jpy") == "500 JPY"
    assert money(5, "eur") == "0.05 EUR"
    assert money("?", "usd") == "? USD"


# --------------------------------------------------------------------------- Discord


def big_message(sections: int, text: int, fields: int = 30, value: int = 2000) -> Message:
    return Message(
        "H" * 3000,
        tuple(Section(f"title {i} " + "t" * 300, "d" * text,
                      tuple(Field("n" * 300, "v" * value) for _ in range(fields)),
                      Severity.CRITICAL, url="http://prom:9090/graph?g0.expr=up")
              for i in range(sections)),
        "x.y", "id", footer="f" * 3000)


@pytest.mark.parametrize(("sections", "text", "fields", "value"), [
    (1, 10, 0, 0), (1, 5000, 30, 2000), (12, 3000, 0, 0), (15, 100, 25, 1024),
    (10, 550, 0, 0), (3, 0, 1, 1), (0, 0, 0, 0),
])
def test_discord_payloads_always_fit(sections: int, text: int, fields: int,
                                     value: int) -> None:
    out = discord.payload(big_message(sections, text, fields, value))
    assert discord.check(out) == []
    assert units(out["content"]) <= discord.CONTENT
    assert sum(discord.embed_chars(e) for e in out["embeds"]) <= discord.TOTAL
    if sections > len(out["embeds"]):
        assert f"+{sections - len(out['embeds'])} more not shown" in out["content"]


def test_discord_fit_keeps_what_fits_whole() -> None:
    m = Message("hi", (Section("one", "text", (Field("a", "1"),), Severity.INFO),),
                "x.y", "id", footer="x.y · id")
    out = discord.payload(m)
    assert out["content"] == "hi"
    (embed,) = out["embeds"]
    assert embed == {"title": "one", "description": "text", "color": discord.COLORS[
        Severity.INFO], "fields": [{"name": "a", "value": "1", "inline": True}],
        "footer": {"text": "x.y · id"}}


def test_discord_fit_repairs_what_discord_would_refuse() -> None:
    raw = {"content": "c", "embeds": [{"title": "t", "color": -1, "url": "not a url",
                                       "fields": [{"name": "", "value": "  "}],
                                       "author": {"name": "a" * 300}}]}
    out = discord.fit(raw)
    assert discord.check(out) == []
    (embed,) = out["embeds"]
    assert "color" not in embed and "url" not in embed
    assert embed["fields"] == [{"name": "-", "value": "-", "inline": False}]
    assert units(embed["author"]["name"]) == 256


def test_discord_fit_randomized() -> None:
    rng = random.Random(7)
    text = "".join(rng.choices("aé🔥 \n<>&", k=20_000))
    for _ in range(100):
        def s(n: int) -> str:
            start = rng.randint(0, 10_000)
            return text[start:start + rng.randint(0, n)]

        raw = {"content": s(2500), "embeds": [
            {"title": s(400), "description": s(5000), "footer": {"text": s(2500)},
             "fields": [{"name": s(300), "value": s(1500), "inline": rng.random() < 0.5}
                        for _ in range(rng.randint(0, 30))]}
            for _ in range(rng.randint(0, 14))]}
        out = discord.fit(raw)
        problems = discord.check(out)
        assert problems == [] or problems == ["empty message"], problems


def test_discord_check_finds_every_broken_limit() -> None:
    bad = {"content": "c" * 2001, "embeds": [
        {"title": "t" * 257, "description": "d" * 4097, "footer": {"text": "f" * 2049},
         "fields": [{"name": "", "value": "v" * 1025}] * 26}] * 11}
    problems = discord.check(bad)
    for needle in ("content over 2000", "more than 10 embeds", "title over 256",
                   "description over 4096", "more than 25 fields", "name empty",
                   "value empty or over 1024", "footer.text over 2048", "total"):
        assert any(needle in p for p in problems), needle


# --------------------------------------------------------------------------- Slack


def test_slack_payload_within_limits_and_escaped() -> None:
    m = Message("<!channel> & more " + "h" * 200,
                tuple(Section(f"s{i} <b>", "x" * 4000,
                              tuple(Field(f"f{j}", "v" * 2500) for j in range(12)),
                              Severity.WARNING, url="https://prom/graph?x=1")
                      for i in range(30)),
                "x.y", "id", footer="footer")
    out = slack.payload(m)
    assert slack.check(out) == []
    blocks = out["blocks"]
    assert len(blocks) <= 50
    assert blocks[0]["text"]["text"].startswith("<!channel> & more")  # plain text: inert
    assert len(blocks[0]["text"]["text"]) <= 150
    assert "<https://prom/graph?x=1|s0 &lt;b&gt;>" in blocks[1]["text"]["text"]
    assert any("more not shown" in json.dumps(b) for b in blocks)
    assert blocks[-1]["elements"][0]["text"] == "footer"
    assert len(out["text"]) <= 3000 and "<!channel>" not in out["text"]


def test_slack_small_message() -> None:
    m = describe(event("tenant.suspended", tenant_id="t1", reason="unpaid"))
    out = slack.payload(m)
    assert out["text"] == "Tenant suspended: unpaid"
    assert [b["type"] for b in out["blocks"]] == ["header", "section", "section", "context"]
    assert out["blocks"][1]["text"]["text"].startswith(":large_orange_circle: *Tenant")


def test_slack_check_finds_broken_limits() -> None:
    bad = {"blocks": [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}},
                      {"type": "section", "text": {"type": "mrkdwn", "text": ""}},
                      {"type": "section", "fields": [{"type": "mrkdwn", "text": "x"}] * 11},
                      {"type": "section"}] * 13}
    problems = slack.check(bad)
    for needle in ("more than 50 blocks", "header text", "section text", "more than 10 fields",
                   "without text or fields"):
        assert any(needle in p for p in problems), needle


# --------------------------------------------------------------------------- e-mail


def test_email_has_text_and_escaped_html() -> None:
    m = describe(event("deployment.no_active_nodes", model_name="<script>x</script>",
                       deployment_id="d1", since="2026-01-01T11:00:00Z"))
    sub = uuid.uuid4()
    built = mail.build(m, sender="CrossLogic <n@x.test>", recipient="ops@acme.test",
                       subscription_id=sub)
    assert built["Subject"] == "[CrossLogic] No active nodes for <script>x</script>"
    assert built["Message-ID"] == f"<{m.event_id}.{sub}@notifier.crosslogic>"
    text = built.get_body(preferencelist=("plain",))
    html = built.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert "<script>" in text.get_content()
    assert "<script>" not in html.get_content() and "&lt;script&gt;" in html.get_content()
    long = Message("a\nb " + "s" * 500, (), "x.y", "id")
    assert "\n" not in mail.subject(long) and len(mail.subject(long)) <= 200


# --------------------------------------------------------------------------- generic


def test_generic_webhooks_verify_with_the_standard_library() -> None:
    secret = generate_signing_secret()
    e = event("billing.payment_failed", invoice_id="in_1")
    body = generic.body(e)
    headers = generic.headers(secret, e["id"], body, datetime.now(UTC))
    assert headers["webhook-id"] == e["id"]
    assert Webhook(secret).verify(body, headers) == {"type": "billing.payment_failed",
                                                     "timestamp": e["occurred_at"], "data": e}
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_signing_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


# --------------------------------------------------------------------------- Alertmanager


def am_payload(**overrides: Any) -> bytes:
    payload = {"version": "4", "groupKey": "{}:{alertname=\"HighLatency\"}", "status": "firing",
               "receiver": "crosslogic", "truncatedAlerts": 3,
               "groupLabels": {"alertname": "HighLatency"}, "commonLabels": {},
               "commonAnnotations": {}, "externalURL": "http://am:9093",
               "alerts": [{"status": "firing",
                           "labels": {"alertname": "HighLatency", "severity": "warning"},
                           "annotations": {"summary": "p95 above 30 s"},
                           "startsAt": "2026-01-01T12:00:00.123456789Z",
                           "endsAt": "0001-01-01T00:00:00Z",
                           "generatorURL": "http://prom/graph", "fingerprint": "ab"},
                          {"status": "resolved", "labels": {"alertname": "HighLatency"},
                           "annotations": {}, "startsAt": "2026-01-01T11:00:00Z",
                           "endsAt": "2026-01-01T11:30:00Z"}]}
    payload.update(overrides)
    return json.dumps(payload).encode()


def test_alertmanager_v4_becomes_one_event() -> None:
    e = alertmanager.to_event(alertmanager.parse(am_payload()))
    assert e.type == "notification.alert" and e.subject == f"notification.alert.{e.group_id}"
    assert len(e.group_id) == 16 and e.truncated_alerts == 3
    first, second = e.alerts
    assert first.ends_at is None and first.starts_at is not None
    assert first.starts_at.microsecond == 123457
    assert second.ends_at == datetime(2026, 1, 1, 11, 30, tzinfo=UTC)
    m = describe(msgspec.json.decode(encode_event(e)))
    assert m.headline == "[FIRING:1] HighLatency"
    assert [s.severity for s in m.sections] == [Severity.WARNING, Severity.RESOLVED]
    assert m.sections[0].text == "p95 above 30 s" and m.sections[0].url == "http://prom/graph"
    assert m.omitted == 3
    assert "+3 more not shown" in discord.payload(m)["content"]


@pytest.mark.parametrize(("body", "says"), [
    (am_payload(version="3"), "version"),
    (am_payload(status="pending"), "firing or resolved"),
    (b"[]", "not an Alertmanager"),
    (b"{", "not an Alertmanager"),
    (json.dumps({"version": "4", "status": "firing"}).encode(), "alerts"),
])
def test_alertmanager_refuses_what_it_cannot_read(body: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        alertmanager.parse(body)
