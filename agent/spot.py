"""Spot/preemption notices from each cloud's instance metadata service.

- AWS (IMDSv2): PUT /latest/api/token for a session token, then
  GET /latest/meta-data/spot/instance-action: 404 = nothing; 200 = {"action", "time"}.
- GCP: GET /computeMetadata/v1/instance/preempted with `Metadata-Flavor: Google` answers TRUE
  once the VM is being preempted. GCP gives ~30 s, so the detector long-polls: one plain GET
  for the value and its ETag, then `wait_for_change=true&last_etag=<etag>`, which the server
  answers at once when the value's ETag is no longer that one and otherwise holds until it
  changes or `timeout_sec`. No change can fall between two polls unseen.
- Azure: GET /metadata/scheduledevents?api-version=2020-07-01 with `Metadata: true`; a
  `Preempt` event's `NotBefore` is the deadline.

Parsing is pure; the detectors only fetch. A body that is not what the cloud documents
raises ValueError: one failed look, never a crashed watcher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp

GCP_PREEMPTION_NOTICE = timedelta(seconds=30)


@dataclass(frozen=True)
class SpotNotice:
    provider: str
    action: str
    deadline: datetime | None


class SpotDetector(Protocol):
    provider: str

    async def poll(self, session: aiohttp.ClientSession) -> SpotNotice | None:
        """One look (GCP: one long poll); None when no notice is pending."""

    @property
    def pause_before_next(self) -> bool:
        """Whether the caller should wait its poll interval before the next poll (False when
        the next poll itself waits for a change)."""


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def parse_aws_instance_action(body: Any) -> SpotNotice:
    if not isinstance(body, dict):
        raise ValueError(f"instance-action is not a JSON object: {type(body).__name__}")
    when = body.get("time")
    if when is not None and not isinstance(when, str):
        raise ValueError(f"instance-action time is not a string: {when!r}")
    deadline = _aware(datetime.fromisoformat(when.replace("Z", "+00:00"))) if when else None
    return SpotNotice("aws", str(body.get("action") or "terminate"), deadline)


def parse_gcp_preempted(text: str, now: datetime) -> SpotNotice | None:
    if text.strip().upper() != "TRUE":
        return None
    return SpotNotice("gcp", "preempt", now + GCP_PREEMPTION_NOTICE)


def parse_azure_events(body: Any) -> SpotNotice | None:
    if not isinstance(body, dict):
        raise ValueError(f"scheduled events is not a JSON object: {type(body).__name__}")
    events = body.get("Events") or []
    if not isinstance(events, list):
        raise ValueError(f"Events is not a list: {type(events).__name__}")
    for event in events:
        if not isinstance(event, dict) or event.get("EventType") != "Preempt":
            continue
        not_before = event.get("NotBefore") or ""
        if not isinstance(not_before, str):
            raise ValueError(f"NotBefore is not a string: {not_before!r}")
        try:
            deadline = _aware(parsedate_to_datetime(not_before)) if not_before else None
        except (TypeError, IndexError, ValueError) as exc:  # email.utils' ways to refuse
            raise ValueError(f"NotBefore is not a date: {not_before!r}") from exc
        return SpotNotice("azure", "preempt", deadline)
    return None


class AwsSpot:
    provider = "aws"
    TOKEN_TTL = "21600"

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self._token: str | None = None

    async def _token_for(self, session: aiohttp.ClientSession) -> str:
        if self._token is None:
            async with session.put(f"{self.base}/latest/api/token",
                                   headers={"X-aws-ec2-metadata-token-ttl-seconds":
                                            self.TOKEN_TTL}) as resp:
                resp.raise_for_status()
                self._token = await resp.text()
        return self._token

    @property
    def pause_before_next(self) -> bool:
        return True

    async def poll(self, session: aiohttp.ClientSession) -> SpotNotice | None:
        token = await self._token_for(session)
        async with session.get(f"{self.base}/latest/meta-data/spot/instance-action",
                               headers={"X-aws-ec2-metadata-token": token}) as resp:
            if resp.status == 404:
                return None
            if resp.status == 401:  # token expired: get a new one next time
                self._token = None
                return None
            resp.raise_for_status()
            return parse_aws_instance_action(await resp.json(content_type=None))


class GcpSpot:
    provider = "gcp"

    def __init__(self, base_url: str, *, wait_seconds: int = 30) -> None:
        self.base = base_url.rstrip("/")
        self.wait_seconds = wait_seconds
        self.etag: str | None = None
        """The ETag of the value last seen; None until the server has sent one."""
        self._returned_early = False

    @property
    def pause_before_next(self) -> bool:
        # Without an ETag the next poll cannot wait for a change; a server that answered a
        # long poll early with the value unchanged is not holding polls: don't spin on it.
        return self.etag is None or self._returned_early

    async def poll(self, session: aiohttp.ClientSession) -> SpotNotice | None:
        url = f"{self.base}/computeMetadata/v1/instance/preempted"
        sent = self.etag
        params: dict[str, str] = {}
        if sent is not None:
            params = {"wait_for_change": "true", "last_etag": sent,
                      "timeout_sec": str(self.wait_seconds)}
        timeout = aiohttp.ClientTimeout(total=self.wait_seconds + 5)
        started = time.monotonic()
        async with session.get(url, params=params, headers={"Metadata-Flavor": "Google"},
                               timeout=timeout) as resp:
            resp.raise_for_status()
            text = await resp.text()
            self.etag = resp.headers.get("ETag") or None
        self._returned_early = (sent is not None and self.etag == sent
                                and time.monotonic() - started < self.wait_seconds / 2)
        return parse_gcp_preempted(text, datetime.now(UTC))


class AzureSpot:
    provider = "azure"

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")

    @property
    def pause_before_next(self) -> bool:
        return True

    async def poll(self, session: aiohttp.ClientSession) -> SpotNotice | None:
        async with session.get(f"{self.base}/metadata/scheduledevents",
                               params={"api-version": "2020-07-01"},
                               headers={"Metadata": "true"}) as resp:
            resp.raise_for_status()
            return parse_azure_events(await resp.json(content_type=None))


def detector_for(provider: str, base_url: str) -> SpotDetector | None:
    match provider.strip().lower():
        case "aws":
            return AwsSpot(base_url)
        case "gcp":
            return GcpSpot(base_url)
        case "azure":
            return AzureSpot(base_url)
    return None
