"""Backups that leave the cluster, against a real S3 API server (moto's, started here) and real
PostgreSQL: `crosslogic backup --to s3://…` uploads and prunes, `crosslogic restore s3://…`
restores straight from there into a new cluster, every table as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import aiohttp
import boto3
import pytest

from services.cli.main import _run_projections
from services.cli.offsite import backup_name
from services.cli.registry import all_projections
from services.infra.db import create_pool
from services.infra.devstack import die_with_parent, free_port
from tests.helpers import eventually
from tests.integration.test_backup import (  # noqa: F401
    _seed,
    _snapshot,
    own_database,
    second_cluster,
)
from tests.integration.test_cli import CLI

BUCKET = "crosslogic-backups"


def start_s3_server(port: int, log: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)


@pytest.fixture
async def s3_url(tmp_path: Path) -> AsyncIterator[str]:
    """moto's S3 API server, in a process of its own."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    proc = start_s3_server(port, log)
    url = f"http://127.0.0.1:{port}"

    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(answers, timeout=60, interval=0.1, what="the S3 API server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def s3_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "R2_")) and k != "DATABASE_URL"}
    return {**env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": url}


def cli(env: dict[str, str], *args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**env, "DATABASE_URL": database_url},
                          capture_output=True, text=True, timeout=120, check=False)


async def test_backup_to_s3_and_restore_from_there_into_a_new_cluster(
        own_database: str, second_cluster: str, s3_url: str) -> None:  # noqa: F811
    env = s3_env(s3_url)
    s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    # A dump older than 30 days, one just inside, and something not ours, already there.
    old = f"hourly/{backup_name(datetime(2020, 1, 1, tzinfo=UTC))}"
    recent = f"hourly/{backup_name(datetime.now(UTC) - timedelta(days=29))}"
    for key in (old, recent, "hourly/README.txt"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"not a dump")

    pool = await create_pool(own_database, min_size=1, max_size=4)
    try:
        await _seed(pool)
        await _run_projections(own_database, all_projections().names(), rebuild=False)
        before = await _snapshot(pool)
    finally:
        await pool.close()

    done = cli(env, "backup", "--to", f"s3://{BUCKET}/hourly/", database_url=own_database)
    assert done.returncode == 0, done.stderr
    assert "pruned 1 backup(s) older than 30 days" in done.stdout
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    uploaded = keys - {recent, "hourly/README.txt"}
    assert len(uploaded) == 1 and old not in keys  # the old one pruned, nothing else
    (new,) = uploaded
    assert f"wrote s3://{BUCKET}/{new}" in done.stdout
    assert s3.head_object(Bucket=BUCKET, Key=new)["ContentLength"] > 1000
    assert not list(Path.cwd().glob("*.dump*"))  # nothing left behind locally

    # A restore of the newest dump under the prefix, into a cluster that has never seen it.
    refused = cli(env, "restore", f"s3://{BUCKET}/hourly/", "--yes",
                  database_url=second_cluster)
    assert refused.returncode != 0 and "--latest" in refused.stderr
    done = cli(env, "restore", f"s3://{BUCKET}/hourly/", "--latest", "--yes",
               database_url=second_cluster)
    assert done.returncode == 0, done.stderr
    assert f"restored s3://{BUCKET}/{new}" in done.stdout
    pool = await create_pool(second_cluster, min_size=1, max_size=4)
    try:
        after = await _snapshot(pool)
    finally:
        await pool.close()
    for table in before:
        assert after[table] == before[table], table

    # By its name too, with the endpoint given on the command line instead.
    no_endpoint = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL_S3"}
    done = cli(no_endpoint, "restore", f"s3://{BUCKET}/{new}", "--yes", "--endpoint-url",
               s3_url, "--no-rebuild", database_url=second_cluster)
    assert done.returncode == 0, done.stderr


async def test_failures_name_what_failed_and_change_nothing(
        own_database: str, s3_url: str) -> None:  # noqa: F811
    env = s3_env(s3_url)
    # No such bucket: the backup fails, saying so.
    done = cli(env, "backup", "--to", "s3://no-such-bucket/x/", database_url=own_database)
    assert done.returncode != 0 and "no-such-bucket" in done.stderr
    assert done.stderr.startswith("crosslogic backup: uploading to s3://no-such-bucket/x/")
    assert "Traceback" not in done.stderr
    # Nothing under the prefix to restore: refused before the database is touched.
    boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="testing",
                 aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    pool = await create_pool(own_database, min_size=1, max_size=2)
    try:
        await _seed(pool)
        tenants = await pool.fetchval("SELECT count(*) FROM tenants")
        done = cli(env, "restore", f"s3://{BUCKET}/empty/", "--latest", "--yes",
                   database_url=own_database)
        assert done.returncode != 0 and "no crosslogic-*.dump under" in done.stderr
        done = cli(env, "restore", f"s3://{BUCKET}/empty/crosslogic-20260101T000000Z.dump",
                   "--yes", database_url=own_database)
        assert done.returncode != 0 and "downloading" in done.stderr
        assert "Traceback" not in done.stderr
        assert await pool.fetchval("SELECT count(*) FROM tenants") == tenants
    finally:
        await pool.close()
    # A prefix, not a key, for --to.
    done = cli(env, "backup", "--to", f"s3://{BUCKET}/file.dump", database_url=own_database)
    assert done.returncode != 0 and "prefix ending in '/'" in done.stderr
