"""Backups that leave the cluster: `crosslogic backup --to s3://bucket/prefix/` uploads each
dump to S3-compatible object storage (AWS S3, Cloudflare R2, MinIO…), and `crosslogic restore
s3://…` restores straight from there.

Credentials and endpoint come from boto3's own environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL_S3`, `AWS_DEFAULT_REGION`), or, for R2, from the
reference's variables (`R2_ACCOUNT_ID`, `R2_ACCESS_KEY_ID`, `R2_SECRET_ACCESS_KEY`), which
name R2's endpoint themselves: `client_settings`.

Dumps are named `crosslogic-<UTC time>.dump`, so the newest sorts last and the name says when
it was taken whatever the storage's own dates; retention (`--keep-days`, 30) deletes, after a
successful upload, the dumps under the prefix whose name is older (`expired`), nothing else.
A bucket lifecycle rule on the prefix does the same job and may replace it (`--keep-days 0`).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.cli.backup import BackupError

_NAME = re.compile(r"^crosslogic-(\d{8}T\d{6}Z)\.dump$")
_TIME = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str
    """A prefix (ending in `/`, or empty) or an object's whole key."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, self.key + name)


def is_s3_url(value: str) -> bool:
    return value.startswith("s3://")


def parse_s3_url(value: str) -> S3Location:
    """`s3://bucket/prefix/` or `s3://bucket/key.dump`; BackupError names what is wrong."""
    parts = urllib.parse.urlsplit(value)
    bucket = parts.netloc
    if parts.scheme != "s3" or not bucket or parts.query or parts.fragment:
        raise BackupError(f"{value!r} is not an s3://bucket/prefix/ URL")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise BackupError(f"{bucket!r} is not a bucket name")
    return S3Location(bucket, parts.path.lstrip("/"))


def backup_name(now: datetime) -> str:
    return f"crosslogic-{now.astimezone(UTC):{_TIME}}.dump"


def taken_at(name: str) -> datetime | None:
    """When the dump named `name` (the last part of a key) was taken; None: not one of ours."""
    found = _NAME.match(name.rsplit("/", 1)[-1])
    if found is None:
        return None
    return datetime.strptime(found.group(1), _TIME).replace(tzinfo=UTC)


def expired(keys: Iterable[str], now: datetime, keep_days: float) -> list[str]:
    """The keys of our dumps taken more than `keep_days` before `now` (0: keep everything)."""
    if keep_days <= 0:
        return []
    horizon = now - timedelta(days=keep_days)
    return sorted(k for k in keys if (when := taken_at(k)) is not None and when < horizon)


def latest(keys: Iterable[str]) -> str | None:
    """The newest of our dumps among `keys`."""
    ours = [(when, k) for k in keys if (when := taken_at(k)) is not None]
    return max(ours)[1] if ours else None


def client_settings(env: Mapping[str, str], endpoint_url: str | None = None) -> dict[str, Any]:
    """boto3 client arguments: `endpoint_url` if given; else R2's when the reference's R2_*
    credentials are set and AWS's are not; else nothing (boto3 reads its own environment)."""
    settings: dict[str, Any] = {}
    if not env.get("AWS_ACCESS_KEY_ID") and env.get("R2_ACCESS_KEY_ID"):
        account = env.get("R2_ACCOUNT_ID", "")
        if not account and endpoint_url is None:
            raise BackupError("R2_ACCESS_KEY_ID is set but R2_ACCOUNT_ID is not: R2's "
                              "endpoint is https://<account id>.r2.cloudflarestorage.com")
        settings.update(aws_access_key_id=env["R2_ACCESS_KEY_ID"],
                        aws_secret_access_key=env.get("R2_SECRET_ACCESS_KEY", ""),
                        region_name="auto",
                        endpoint_url=f"https://{account}.r2.cloudflarestorage.com")
    if endpoint_url:
        settings["endpoint_url"] = endpoint_url
    return settings


class OffsiteStore:
    """The object storage, through boto3 (synchronous: the CLI has no event loop to block)."""

    def __init__(self, env: Mapping[str, str], endpoint_url: str | None = None) -> None:
        import boto3  # the CLI's other commands need not load it

        self._client = boto3.client("s3", **client_settings(env, endpoint_url))

    def _call(self, what: str, action: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return action(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:  # Boto3Error: upload_file's
            raise BackupError(f"{what}: {exc}") from None

    def upload(self, path: Path, where: S3Location) -> int:
        """Upload `path` to `where`, then check the storage holds all of it; its size."""
        size = path.stat().st_size
        self._call(f"uploading to {where.url}", self._client.upload_file,
                   Filename=str(path), Bucket=where.bucket, Key=where.key)
        head = self._call(f"checking {where.url}", self._client.head_object,
                          Bucket=where.bucket, Key=where.key)
        if int(head["ContentLength"]) != size:
            raise BackupError(f"{where.url} holds {head['ContentLength']} bytes, not {size}")
        return size

    def keys(self, prefix: S3Location) -> list[str]:
        """Every key under the prefix (pages followed)."""
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self._client.get_paginator("list_objects_v2")
        found: list[str] = []
        try:  # the pages are fetched as they are read
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                found.extend(o["Key"] for o in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise BackupError(f"listing {prefix.url}: {exc}") from None
        return found

    def download(self, where: S3Location, path: Path) -> int:
        self._call(f"downloading {where.url}", self._client.download_file,
                   Bucket=where.bucket, Key=where.key, Filename=str(path))
        return path.stat().st_size

    def delete(self, bucket: str, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's most per call
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            answer = self._call(f"deleting from s3://{bucket}", self._client.delete_objects,
                                Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                raise BackupError(f"deleting from s3://{bucket}: {answer['Errors'][0]}")
