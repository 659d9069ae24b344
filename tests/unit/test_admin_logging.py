"""Logs as a service writes them (the admin API and every other): with JSON on, the lines of
libraries that use stdlib logging (aiohttp, asyncpg, nats) are JSON objects too, carrying
the same fields and masking."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# configure_logging changes the process's logging for good: run it in a process of its own.
PROGRAM = textwrap.dedent("""
    import logging
    import structlog
    from services.infra.logging import configure_logging

    configure_logging("info", json={json}, service="admin")
    configure_logging("info", json={json}, service="admin")  # twice: no doubled lines
    structlog.get_logger("admin").warning("own line", token="s3cret-structlog")
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        logging.getLogger("asyncpg.pool").warning("pool %s is %s", "p1", "tired",
                                                  extra={{"password": "s3cret-extra"}})
    logging.getLogger("nats.aio.client").info("below WARNING: not shown")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
""")


def run(json_logs: bool) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROGRAM.format(json=json_logs)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == ""
    return done.stderr.splitlines()


def test_library_lines_are_json_when_json_is_on() -> None:
    lines = run(True)
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    assert [r["event"] for r in records] == ["own line", "pool p1 is tired",
                                              "Error handling request"]
    own, pool, error = records
    assert own["token"] == "**********" and own["service"] == "admin"
    assert (pool["logger"], pool["level"], pool["service"], pool["request_id"]) == \
        ("asyncpg.pool", "warning", "admin", "req-1")
    assert pool["password"] == "**********" and "timestamp" in pool
    assert error["logger"] == "aiohttp.server" and error["level"] == "error"
    assert "ZeroDivisionError" in error["exception"]
    assert "s3cret" not in "\n".join(lines)


def test_library_lines_are_readable_on_a_terminal() -> None:
    text = "\n".join(run(False))
    assert "pool p1 is tired" in text and "own line" in text
    assert "not shown" not in text and "s3cret" not in text
