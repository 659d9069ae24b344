"""RESP encoding and parsing of the pipelined Redis client (pure)."""

from __future__ import annotations

import pytest
from redis.exceptions import NoScriptError, ResponseError

from services.infra.pipelined_redis import _Incomplete, encode_command, parse_reply


def test_encode_command() -> None:
    assert encode_command(("EVALSHA", "ab", 2, b"k", 1.5)) == \
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$1\r\nk\r\n$3\r\n1.5\r\n"


@pytest.mark.parametrize(("wire", "value"), [
    (b":42\r\n", 42), (b":-1\r\n", -1), (b"+OK\r\n", "OK"), (b"$3\r\nabc\r\n", b"abc"),
    (b"$-1\r\n", None), (b"*-1\r\n", None), (b"*0\r\n", []),
    (b"*3\r\n:1\r\n$2\r\nhi\r\n*1\r\n:2\r\n", [1, b"hi", [2]]),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
])
def test_parse_reply(wire: bytes, value: object) -> None:
    assert parse_reply(wire, 0) == (value, len(wire))


def test_error_replies_are_values_not_raised() -> None:
    err, _ = parse_reply(b"-ERR boom\r\n", 0)
    assert isinstance(err, ResponseError) and "boom" in str(err)
    missing, _ = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(missing, NoScriptError)


@pytest.mark.parametrize("cut", range(1, 17))
def test_incomplete_replies_wait_for_more(cut: int) -> None:
    wire = b"*2\r\n:1\r\n$4\r\nabcd\r\n"
    if cut >= len(wire):
        return
    with pytest.raises(_Incomplete):
        parse_reply(wire[:cut], 0)


def test_several_replies_in_one_buffer() -> None:
    buf = b":1\r\n:2\r\n$1\r\nx\r\n"
    first, pos = parse_reply(buf, 0)
    second, pos = parse_reply(buf, pos)
    third, pos = parse_reply(buf, pos)
    assert (first, second, third, pos) == (1, 2, b"x", len(buf))
