"""Nodes launched in public clouds reach NATS over TLS only: the orchestrator refuses to start
the SkyPilot launcher with a node NATS URL that is not tls://."""

from __future__ import annotations

import pytest

from services.infra.settings import Secret
from services.orchestrator.app import LauncherError, create_orchestrator_app, node_nats_url_error
from services.orchestrator.settings import OrchestratorSettings


def test_the_skypilot_launcher_needs_tls_for_nodes() -> None:
    assert node_nats_url_error("skypilot", "tls://nats.example:4222", "nats://nats:4222") is None
    assert node_nats_url_error("skypilot", "", "tls://nats:4222") is None  # NATS_URL serves
    for node, service in (("", "nats://nats:4222"), ("nats://edge:4222", "tls://nats:4222"),
                          ("ws://edge:80", ""), ("", "")):
        problem = node_nats_url_error("skypilot", node, service)
        assert problem is not None and "NODE_NATS_URL" in problem and "tls://" in problem
    # Nodes of the local launcher run on this machine.
    assert node_nats_url_error("local", "", "nats://127.0.0.1:4222") is None


def test_the_orchestrator_refuses_to_start_skypilot_without_tls() -> None:
    settings = OrchestratorSettings(launcher="skypilot",
                                    nats_url=Secret("nats://user:s3cret@nats:4222"))
    with pytest.raises(LauncherError, match="NODE_NATS_URL") as refused:
        create_orchestrator_app(settings)
    assert "s3cret" not in str(refused.value)  # the URL (with its password) is never shown
