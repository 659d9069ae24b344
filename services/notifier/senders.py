"""Sending one notification: HTTP for Discord, Slack and generic webhooks, SMTP for e-mail.

Each attempt returns an `AttemptResult` (never raises for the endpoint's failures): the status,
the time taken, the start of the answer, and what a 429 or Discord's rate-limit headers ask.
Error texts are scrubbed of the target and the secret before they are kept or logged.

Unless `allow_private_targets`, requests to loopback, private, link-local and other
non-public addresses are refused (a tenant's webhook must not reach into the platform's own
network): literal addresses before the request, names in the resolver, so a name that
resolves to such an address after the check cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from services.domain.notifications.targets import Kind, scrub
from services.notifier import discord, generic, mail, slack
from services.notifier.messages import describe
from services.notifier.policy import AttemptResult, bucket_pause, retry_after_of
from services.notifier.settings import NotifierSettings

MAX_READ = 64 * 1024


@dataclass(frozen=True)
class Target:
    subscription_id: uuid.UUID
    tenant_id: uuid.UUID | None
    kind: Kind
    address: str
    """The URL or e-mail address: a secret (webhook URLs embed their token)."""
    signing_secret: str
    masked: str

    def __repr__(self) -> str:
        return f"Target({self.subscription_id}, {self.kind.value}, {self.masked!r})"


class TargetNotAllowed(OSError):
    pass


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, and refuses names with a non-public
    address among their answers."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            if not public_address(entry["host"]):
                raise TargetNotAllowed(f"{host} resolves to a non-public address")
        return found

    async def close(self) -> None:
        await self._inner.close()


def make_session(settings: NotifierSettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=None if settings.allow_private_targets else PublicOnlyResolver(),
        limit=max(settings.concurrency * 2, 10), ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=settings.http_timeout_seconds),
        headers={"User-Agent": generic.USER_AGENT})


def _literal_allowed(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
        raise TargetNotAllowed(f"{host} is not a public host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks its addresses
    if not public_address(host):
        raise TargetNotAllowed(f"{host} is not a public address")


def _refusal_of(exc: BaseException) -> TargetNotAllowed | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TargetNotAllowed):
            return seen
        inner = getattr(seen, "os_error", None)
        seen = inner if isinstance(inner, BaseException) and inner is not seen \
            else seen.__cause__
    return None


class Sender:
    def __init__(self, settings: NotifierSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session

    async def send(self, target: Target, event: Mapping[str, Any]) -> AttemptResult:
        if target.kind is Kind.EMAIL:
            return await self._mail(target, event)
        message_id = str(event.get("id", ""))
        if target.kind is Kind.GENERIC:
            body = generic.body(event)
            headers = generic.headers(target.signing_secret, message_id, body,
                                      datetime.now(UTC))
        else:
            message = describe(event)
            shaped = discord.payload(message) if target.kind is Kind.DISCORD \
                else slack.payload(message)
            body = msgspec.json.encode(shaped)
            headers = {"Content-Type": "application/json"}
        return await self._post(target, body, headers)

    async def _post(self, target: Target, body: bytes,
                    headers: Mapping[str, str]) -> AttemptResult:
        started = time.perf_counter()

        def ms() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        try:
            if not self.settings.allow_private_targets:
                _literal_allowed(target.address)
            async with self.session.post(target.address, data=body, headers=dict(headers),
                                         allow_redirects=False) as response:
                raw = await response.content.read(MAX_READ)
                latency = ms()
                answer_headers = dict(response.headers)
                retry_after = (retry_after_of(answer_headers, raw, datetime.now(UTC))
                               if response.status == 429 else None)
                return AttemptResult(
                    response.status, latency, self._excerpt(raw, target),
                    retry_after=retry_after, pause=bucket_pause(answer_headers))
        except TargetNotAllowed as exc:
            return AttemptResult(None, ms(), error=f"refused: {exc}", refused=True)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            refusal = _refusal_of(exc)
            if refusal is not None:
                return AttemptResult(None, ms(), error=f"refused: {refusal}", refused=True)
            return AttemptResult(None, ms(), error=self._error(exc, target))

    def _excerpt(self, raw: bytes, target: Target) -> str:
        text = raw[:self.settings.response_excerpt_chars * 4].decode("utf-8", "replace")
        return scrub(text[:self.settings.response_excerpt_chars], target.address,
                     target.signing_secret)

    @staticmethod
    def _error(exc: BaseException, target: Target) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        path = urlsplit(target.address).path if target.kind is not Kind.EMAIL else ""
        return scrub(text, target.address, path, target.signing_secret)[:500]

    async def _mail(self, target: Target, event: Mapping[str, Any]) -> AttemptResult:
        s = self.settings
        started = time.perf_counter()

        def ms() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        if not s.smtp_host:
            return AttemptResult(None, 0.0, error="refused: SMTP is not configured (SMTP_HOST)",
                                 refused=True)
        message = mail.build(describe(event), sender=s.smtp_from, recipient=target.address,
                             subscription_id=target.subscription_id)
        try:
            _, reply = await aiosmtplib.send(
                message, hostname=s.smtp_host, port=s.smtp_port,
                username=s.smtp_username or None,
                password=s.smtp_password.reveal() or None,
                use_tls=s.smtp_security == "tls", start_tls=s.smtp_security == "starttls",
                timeout=s.smtp_timeout_seconds)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            code = codes[0] if codes else None
            # 5xx for the mailbox: it does not exist or will never take mail from us.
            permanent = bool(codes) and all(c >= 500 for c in codes)
            # SMTP servers quote the mailbox in their refusals: scrubbed like a webhook's URL.
            error = (f"recipient refused: {exc.recipients[0]}" if exc.recipients
                     else "recipient refused")
            return AttemptResult(code, ms(), error=scrub(error, target.address)[:500],
                                 permanent=permanent)
        except aiosmtplib.SMTPResponseException as exc:
            error = scrub(f"SMTP {exc.code}: {exc.message}", target.address)
            return AttemptResult(exc.code, ms(), error=error[:500])
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return AttemptResult(None, ms(), error=self._error(exc, target))
        excerpt = scrub(reply, target.address)[:s.response_excerpt_chars]
        return AttemptResult(250, ms(), excerpt=excerpt, delivered=True)
