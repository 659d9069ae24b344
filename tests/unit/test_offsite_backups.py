"""Off-site backups' pure parts: locations, names, retention, the newest, credentials."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.cli.backup import BackupError
from services.cli.offsite import (
    S3Location,
    backup_name,
    client_settings,
    expired,
    latest,
    parse_s3_url,
    taken_at,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_s3_urls() -> None:
    assert parse_s3_url("s3://backups/hourly/") == S3Location("backups", "hourly/")
    assert parse_s3_url("s3://backups/hourly/").is_prefix
    assert parse_s3_url("s3://backups") == S3Location("backups", "")
    where = parse_s3_url("s3://backups/a/crosslogic-20261204T120000Z.dump")
    assert not where.is_prefix and where.url == "s3://backups/a/crosslogic-20261204T120000Z.dump"
    for bad in ("http://backups/x/", "s3:///x/", "s3://Bad_Bucket/x/", "s3://b/x/?v=1", "x"):
        with pytest.raises(BackupError):
            parse_s3_url(bad)


def test_names_say_when_and_sort_in_time() -> None:
    name = backup_name(NOW)
    assert name == "crosslogic-20261204T120000Z.dump"
    assert taken_at(f"hourly/{name}") == NOW
    assert taken_at("hourly/crosslogic-latest.dump") is None
    assert taken_at("hourly/other-20261204T120000Z.dump") is None


def test_retention_deletes_only_our_old_dumps() -> None:
    keys = ["h/crosslogic-20261104T115959Z.dump",  # 30 days and a second
            "h/crosslogic-20261104T120001Z.dump",  # a second short of 30 days
            "h/crosslogic-20261204T110000Z.dump",
            "h/crosslogic-20200101T000000Z.dump.partial", "h/notes.txt"]
    assert expired(keys, NOW, 30) == ["h/crosslogic-20261104T115959Z.dump"]
    assert expired(keys, NOW, 0) == []


def test_the_newest_dump() -> None:
    assert latest(["h/crosslogic-20261203T000000Z.dump", "h/crosslogic-20261204T000000Z.dump",
                   "h/zzz.dump"]) == "h/crosslogic-20261204T000000Z.dump"
    assert latest(["h/zzz.dump"]) is None


def test_credentials_from_aws_or_from_the_reference_s_r2_variables() -> None:
    assert client_settings({}) == {}  # boto3 reads AWS_* itself
    assert client_settings({"AWS_ACCESS_KEY_ID": "a", "R2_ACCESS_KEY_ID": "r"}) == {}
    r2 = client_settings({"R2_ACCOUNT_ID": "acct", "R2_ACCESS_KEY_ID": "r",
                          "R2_SECRET_ACCESS_KEY": "s"})
    assert r2 == {"aws_access_key_id": "r", "aws_secret_access_key": "s", "region_name": "auto",
                  "endpoint_url": "https://acct.r2.cloudflarestorage.com"}
    with pytest.raises(BackupError, match="R2_ACCOUNT_ID"):
        client_settings({"R2_ACCESS_KEY_ID": "r"})
    assert client_settings({}, "http://127.0.0.1:9000") == {
        "endpoint_url": "http://127.0.0.1:9000"}
