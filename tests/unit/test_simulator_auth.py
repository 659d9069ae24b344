"""`vllm serve --api-key` as the simulator applies it: which paths want the key, and how the
Authorization header is read (pure; the HTTP behaviour is in
tests/integration/test_simulator_auth.py)."""

from __future__ import annotations

import pytest

from agent.simulator.auth import ApiKeys, guarded


@pytest.mark.parametrize(("method", "path", "wanted"), [
    ("POST", "/v1/chat/completions", True), ("POST", "/v1/completions", True),
    ("POST", "/v1/embeddings", True), ("GET", "/v1/models", True),
    ("GET", "/v1/nothing-here", True), ("GET", "/v1", True), ("POST", "/v2/x", True),
    ("POST", "/inference/v1/generate", True), ("POST", "/cohere/v2/embed", True),
    # Not under /v1, guarded as current vLLM derives prefixes from its routes (0.11: open).
    ("POST", "/tokenize", True), ("POST", "/detokenize", True), ("POST", "/score", True),
    ("POST", "/rerank", True), ("POST", "/v2/rerank", True),
    ("GET", "/health", False), ("GET", "/metrics", False), ("GET", "/version", False),
    ("GET", "/ping", False), ("GET", "/load", False),
    ("OPTIONS", "/v1/chat/completions", False),  # CORS preflight: never authenticated
    ("POST", "/admin/faults", False),  # the simulator's own, no part of vLLM
])
def test_which_requests_need_the_key(method: str, path: str, wanted: bool) -> None:
    assert guarded(method, path) is wanted


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer k1", True), ("bearer k2", True), ("BEARER k1", True),
    (None, False), ("", False), ("k1", False), ("Basic k1", False), ("Bearer", False),
    ("Bearer  k1", False),  # everything after the first space is the key, as in vLLM
    ("Bearer k1 ", False), ("Bearer k3", False), ("Bearer K1", False),
])
def test_the_header_is_read_as_vllm_reads_it(header: str | None, ok: bool) -> None:
    assert ApiKeys(["k1", "k2"]).verify(header) is ok


def test_no_keys_means_no_check_and_empty_keys_are_none() -> None:
    assert not ApiKeys([]) and not ApiKeys([""])
    assert ApiKeys(["", "k"]).verify("Bearer k") and not ApiKeys(["", "k"]).verify("Bearer ")
    assert "s3cret" not in repr(ApiKeys(["s3cret"]))
