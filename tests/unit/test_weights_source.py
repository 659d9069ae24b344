"""A model's weights source: what the catalog accepts, in what canonical form, and what it
refuses (services/domain/catalog/weights.py)."""

from __future__ import annotations

import random
import re

import hypothesis
import pytest
from hypothesis import strategies as st

from services.domain.catalog.weights import (
    JSON_SCHEMA,
    MAX_LENGTH,
    FileWeights,
    HubWeights,
    InvalidWeightsSource,
    R2Weights,
    WeightsSource,
    parse_weights_source,
)


@pytest.mark.parametrize(("text", "parsed", "canonical"), [
    ("hf://meta-llama/Llama-3.1-8B-Instruct", HubWeights("meta-llama/Llama-3.1-8B-Instruct"),
     None),
    ("hf://Qwen/Qwen2.5-72B-Instruct-AWQ", HubWeights("Qwen/Qwen2.5-72B-Instruct-AWQ"), None),
    ("hf://mistralai/Mixtral-8x7B-Instruct-v0.1",
     HubWeights("mistralai/Mixtral-8x7B-Instruct-v0.1"), None),
    ("hf://_org/x", HubWeights("_org/x"), None),
    ("r2://crosslogic-models/llama-3.1-8b", R2Weights("crosslogic-models", "llama-3.1-8b"),
     None),
    ("r2://crosslogic-models/meta/llama/v2/", R2Weights("crosslogic-models", "meta/llama/v2"),
     "r2://crosslogic-models/meta/llama/v2"),
    ("r2://abc", R2Weights("abc"), None),
    ("r2://abc/", R2Weights("abc"), "r2://abc"),
    ("r2://" + "a" * 63 + "/p", R2Weights("a" * 63, "p"), None),
    ("r2://0models9/x_y.z-1", R2Weights("0models9", "x_y.z-1"), None),
    ("file:///srv/models/llama", FileWeights("/srv/models/llama"), None),
    ("file:///srv/models/llama/", FileWeights("/srv/models/llama"), "file:///srv/models/llama"),
    ("file:///w", FileWeights("/w"), None),
])
def test_accepted(text: str, parsed: WeightsSource, canonical: str | None) -> None:
    assert parse_weights_source(text) == parsed
    assert str(parsed) == (canonical or text)
    assert parse_weights_source(str(parsed)) == parsed  # the canonical form is a fixed point


@pytest.mark.parametrize(("text", "complaint"), [
    # schemes
    ("", "must be hf://"),
    ("meta-llama/Llama-3.1-8B", "must be hf://"),
    ("s3://bucket/prefix", "must be hf://"),
    ("gs://bucket/prefix", "must be hf://"),
    ("https://huggingface.co/meta-llama/x", "must be hf://"),
    ("HF://meta-llama/x", "must be hf://"),
    ("R2://bucket/x", "must be hf://"),
    ("hf:/meta-llama/x", "must be hf://"),
    ("r2:bucket/x", "must be hf://"),
    # hf
    ("hf://", "Hub repo id"),
    ("hf://gpt2", "Hub repo id"),
    ("hf://a/b/c", "Hub repo id"),
    ("hf://org/", "Hub repo id"),
    ("hf:///repo", "Hub repo id"),
    ("hf://org/-repo", "Hub repo id"),
    ("hf://org/repo-", "Hub repo id"),
    ("hf://org/re--po", "Hub repo id"),
    ("hf://org/re po", "Hub repo id"),
    ("hf://org/repo@main", "Hub repo id"),
    ("hf://org/" + "a" * 97, "Hub repo id"),
    ("hf://org/repo\n", "Hub repo id"),
    # r2 buckets: R2's rules, and S3's reserved names
    ("r2://", "not a bucket name"),
    ("r2://ab/x", "not a bucket name"),
    ("r2://" + "a" * 64 + "/x", "not a bucket name"),
    ("r2://Models/x", "not a bucket name"),
    ("r2://my_models/x", "not a bucket name"),
    ("r2://my.models/x", "not a bucket name"),
    ("r2://-models/x", "not a bucket name"),
    ("r2://models-/x", "not a bucket name"),
    ("r2://xn--models/x", "not a bucket name"),
    ("r2://sthree-models/x", "not a bucket name"),
    ("r2://models-s3alias/x", "not a bucket name"),
    ("r2://models--ol-s3/x", "not a bucket name"),
    ("r2://user:pw@models/x", "not a bucket name"),
    # r2 prefixes
    ("r2://models//x", "r2:// prefix"),
    ("r2://models/a//b", "r2:// prefix"),
    ("r2://models/./x", "r2:// prefix"),
    ("r2://models/x y", "r2:// prefix"),
    ("r2://models/x?versionId=1", "r2:// prefix"),
    ("r2://models/x#frag", "r2:// prefix"),
    ("r2://models/$(reboot)", "r2:// prefix"),
    ("r2://models/x'y", "r2:// prefix"),
    ("r2://models/%2e%2e/x", "r2:// prefix"),
    ("r2://models/x\n", "r2:// prefix"),
    ("r2://models\n/x", "not a bucket name"),
    # file
    ("file://", "absolute path"),
    ("file://srv/models", "absolute path"),
    ("file://localhost/srv/models", "absolute path"),
    ("file:///", "not /"),
    ("file:////srv", "file:// path"),
    ("file:///srv/./models", "file:// path"),
    ("file:///srv/my models", "file:// path"),
    ("file:///srv/~user", "file:// path"),
    ("file:///srv/models\x00", "NUL character"),
    ("file:///srv/models\n", "file:// path"),
    # `..`, anywhere
    ("file:///srv/../etc", "'..'"),
    ("r2://models/../other", "'..'"),
    ("r2://models/a..b", "'..'"),
    ("hf://org/repo..x", "'..'"),
])
def test_refused(text: str, complaint: str) -> None:
    with pytest.raises(InvalidWeightsSource, match=complaint):
        parse_weights_source(text)


def test_length_is_bounded() -> None:
    at_limit = "r2://models/" + "a" * (MAX_LENGTH - len("r2://models/"))
    assert str(parse_weights_source(at_limit)) == at_limit
    with pytest.raises(InvalidWeightsSource, match=f"at most {MAX_LENGTH}"):
        parse_weights_source(at_limit + "a")
    with pytest.raises(InvalidWeightsSource, match="at most"):
        parse_weights_source("hf://" + "x" * 1_000_000)


# --------------------------------------------------------------------------- the document's rule


def _ecma(pattern: str) -> re.Pattern[str]:
    """A JSON Schema pattern as ECMA-262 reads it: `$` is the end (Python's `$` also takes a
    trailing newline)."""
    return re.compile(pattern.replace("$", r"\Z"))


_SHAPE = _ecma(JSON_SCHEMA["pattern"])
_REFUSED = [_ecma(p["pattern"]) for p in JSON_SCHEMA["not"]["anyOf"]]


def _documented(text: str) -> bool:
    return len(text) <= MAX_LENGTH and bool(_SHAPE.search(text)) \
        and not any(p.search(text) for p in _REFUSED)


def _accepted(text: str) -> bool:
    try:
        parse_weights_source(text)
    except InvalidWeightsSource:
        return False
    return True


def test_the_documents_rule_is_the_parsers_on_near_misses() -> None:
    """The OpenAPI document's `pattern` and `not` (JSON_SCHEMA) take exactly what
    parse_weights_source takes: checked on strings made of the pieces sources are made of."""
    rng = random.Random(20_240_611)
    starts = ["hf://", "r2://", "file://", "file:///", "r2://xn--", "r2://sthree-", "hf://a/",
              "HF://", ""]
    pieces = [*"hfr2ile:/._-aZ09x", "-s3alias", "--ol-s3", "//", "..", ".-", "-."]
    for _ in range(50_000):
        text = rng.choice(starts) + "".join(rng.choice(pieces)
                                            for _ in range(rng.randrange(12)))
        assert _documented(text) == _accepted(text), text
    for text in ("hf://" + "a" * 96 + "/b", "hf://" + "a" * 97 + "/b", "hf://b/" + "a" * 96,
                 "hf://b/" + "a" * 97, "r2://" + "a" * 63, "r2://" + "a" * 64, "r2://ab",
                 "r2://abc//", "r2://abc/a//", "file:///a\n", "hf://a/b\x00"):
        assert _documented(text) == _accepted(text), text


@hypothesis.settings(max_examples=500, derandomize=True, database=None, deadline=None)
@hypothesis.given(st.from_regex(_SHAPE))
def test_what_the_documents_pattern_generates_is_taken_unless_its_not_refuses_it(
        text: str) -> None:
    assert _documented(text) == _accepted(text), text
