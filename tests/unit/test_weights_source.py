"""A model's weights source: what the catalog accepts, in what canonical form, and what it
refuses (services/core/catalog/weights.py)."""

from __future__ import annotations

import pytest

from services.core.catalog.weights import (
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
    ("file:///srv/models\x00", "file:// path"),
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
