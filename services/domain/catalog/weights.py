"""Where a model's weights come from: the catalog's `weights_source`, as a URI.

    hf://<org>/<repo>         the Hugging Face Hub (what a model without a source uses: its
                              own name as the repo)
    r2://<bucket>[/<prefix>]  a Cloudflare R2 bucket (S3-compatible), copied onto the node
    file:///<absolute path>   a directory on the machine itself: the local cloud only

Pure: `parse_weights_source` is the one judge of a source, for the catalog's commands (a bad
one is refused before it reaches the log) and for the launchers (which turn a good one into a
task). The rules are narrower than what the stores allow, on purpose: each source ends up in a
SkyPilot task and on a command line, so a character set without quotes, spaces or `..` keeps
both dull.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["JSON_SCHEMA", "MAX_LENGTH", "SCHEMES", "FileWeights", "HubWeights",
           "InvalidWeightsSource", "R2Weights", "WeightsSource", "parse_weights_source"]

MAX_LENGTH = 1024
"""S3 and R2 keys stop at 1024 bytes; no source needs more."""
SCHEMES = ("hf", "r2", "file")

# The Hub's own rule for repo ids (huggingface_hub.validate_repo_id): each part at most 96
# characters, starting and ending with a letter, digit or underscore; no "--".
HUB_PART_MAX = 96
_HUB_END = "[A-Za-z0-9_]"
_HUB_PART = re.compile(rf"^{_HUB_END}(?:[A-Za-z0-9_.-]{{0,{HUB_PART_MAX - 2}}}{_HUB_END})?$")
# R2's bucket names (lowercase letters, digits, hyphens; 3 to 63; no hyphen at either end),
# which are also valid S3 names; S3's reserved prefixes and suffixes are refused too, so a
# name means the same bucket on either store.
BUCKET_MIN, BUCKET_MAX = 3, 63
_BUCKET_REGEX = rf"[a-z0-9][a-z0-9-]{{{BUCKET_MIN - 2},{BUCKET_MAX - 2}}}[a-z0-9]"
_BUCKET = re.compile(rf"^{_BUCKET_REGEX}$")
_RESERVED_PREFIXES = ("xn--", "sthree-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3")
_NAME_CHAR = "[A-Za-z0-9_-]"
"""A path segment's characters besides '.'."""
_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


def _source_schema() -> dict[str, Any]:
    """`parse_weights_source`'s rule as JSON Schema, for the OpenAPI document: a `pattern`
    for the shape (no lookaround, so any JSON Schema tool can both check and generate it)
    and a `not` for the two rules a pattern without lookaround cannot add to it (a Hub part
    longer than HUB_PART_MAX, a reserved bucket name). No '..' anywhere: no part of the
    pattern can hold two dots in a row. tests/unit/test_weights_source.py holds the two
    equal."""
    dots = r"(?:\.(?:-\.)*-?|-(?:\.-)*\.?)"  # a run of '.' and '-' with no '..' nor '--'
    hub_part = f"{_HUB_END}(?:{dots}?{_HUB_END})*"
    segment = rf"\.?{_NAME_CHAR}+(?:\.{_NAME_CHAR}+)*\.?"  # not '.', no '..'
    segments = f"{segment}(?:/{segment})*"
    shape = (f"^(?:hf://{hub_part}/{hub_part}"
             f"|r2://{_BUCKET_REGEX}(?:/(?:/|{segments}/?)?)?"
             f"|file:///{segments}/?)$")
    refused = [rf"^hf://(?:[^/]*/)?[^/]{{{HUB_PART_MAX + 1}}}",
               "^r2://(?:" + "|".join(_RESERVED_PREFIXES) + ")",
               "^r2://[^/]*(?:" + "|".join(_RESERVED_SUFFIXES) + ")(?:/|$)"]
    return {"pattern": shape, "not": {"anyOf": [{"pattern": r} for r in refused]}}


JSON_SCHEMA = _source_schema()
"""The extra JSON Schema of a `weights_source` (services/admin/bodies.py)."""


class InvalidWeightsSource(ValueError):
    """Not a source the platform accepts; the message says why, for the operator."""


@dataclass(frozen=True)
class HubWeights:
    repo: str
    """`org/name`."""

    def __str__(self) -> str:
        return f"hf://{self.repo}"


@dataclass(frozen=True)
class R2Weights:
    bucket: str
    prefix: str = ""
    """No leading or trailing slash; empty: the whole bucket."""

    def __str__(self) -> str:
        return f"r2://{self.bucket}/{self.prefix}" if self.prefix else f"r2://{self.bucket}"


@dataclass(frozen=True)
class FileWeights:
    path: str
    """Absolute, no trailing slash."""

    def __str__(self) -> str:
        return f"file://{self.path}"


WeightsSource = HubWeights | R2Weights | FileWeights


def parse_weights_source(text: str) -> WeightsSource:
    """The source `text` names, in its canonical form (`str()` of the result: no trailing
    slash). Raises InvalidWeightsSource."""
    if len(text) > MAX_LENGTH:
        raise InvalidWeightsSource(f"is {len(text)} characters long; at most {MAX_LENGTH}")
    if "\x00" in text:
        raise InvalidWeightsSource("contains a NUL character (U+0000)")
    if ".." in text:
        raise InvalidWeightsSource("must not contain '..'")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidWeightsSource(
            "must be hf://<org>/<repo>, r2://<bucket>/<prefix> or file:///<absolute path>")
    if scheme == "hf":
        return _hub(rest)
    if scheme == "r2":
        return _r2(rest)
    return _file(rest)


def _hub(rest: str) -> HubWeights:
    parts = rest.split("/")
    if len(parts) != 2 or not all(_HUB_PART.fullmatch(p) for p in parts) or "--" in rest:
        raise InvalidWeightsSource(
            "hf:// takes a Hub repo id, <org>/<repo>: letters, digits, '_', '.', '-', each part "
            "at most 96 characters, starting and ending with a letter, digit or '_', no '--'")
    return HubWeights(rest)


def _r2(rest: str) -> R2Weights:
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or bucket.startswith(_RESERVED_PREFIXES) \
            or bucket.endswith(_RESERVED_SUFFIXES):
        raise InvalidWeightsSource(
            f"r2:// bucket {bucket!r} is not a bucket name: 3 to 63 lowercase letters, digits "
            "and '-', starting and ending with a letter or digit (and not xn--…, sthree-…, "
            "…-s3alias or …--ol-s3)")
    prefix = prefix.removesuffix("/")
    if prefix:
        _check_segments(prefix, "r2:// prefix")
    return R2Weights(bucket, prefix)


def _file(rest: str) -> FileWeights:
    if not rest.startswith("/"):
        raise InvalidWeightsSource("file:// takes an absolute path and no host: "
                                   "file:///<absolute path>")
    path = rest.removesuffix("/")
    if not path:
        raise InvalidWeightsSource("file:// needs a directory, not /")
    _check_segments(path.removeprefix("/"), "file:// path")
    return FileWeights(path)


def _check_segments(path: str, what: str) -> None:
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment == ".":
            raise InvalidWeightsSource(
                f"{what} must be '/'-separated names of letters, digits, '_', '.' and '-' "
                f"(no empty name, no '.' alone); {segment!r} is not one")
