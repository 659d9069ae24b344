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

__all__ = ["MAX_LENGTH", "SCHEMES", "FileWeights", "HubWeights", "InvalidWeightsSource",
           "R2Weights", "WeightsSource", "parse_weights_source"]

MAX_LENGTH = 1024
"""S3 and R2 keys stop at 1024 bytes; no source needs more."""
SCHEMES = ("hf", "r2", "file")

# The Hub's own rule for repo ids (huggingface_hub.validate_repo_id): each part at most 96
# characters, starting and ending with a letter, digit or underscore; no "--".
_HUB_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
# R2's bucket names (lowercase letters, digits, hyphens; 3 to 63; no hyphen at either end),
# which are also valid S3 names; S3's reserved prefixes and suffixes are refused too, so a
# name means the same bucket on either store.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


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
