"""The agent's settings: PROVIDER in any case; a spot node on a cloud it cannot watch refused."""

from __future__ import annotations

import pytest

from agent.__main__ import main
from agent.settings import AgentSettings
from agent.spot import AwsSpot, AzureSpot, GcpSpot, detector_for
from services.infra.settings import SettingsError, load_settings


@pytest.mark.parametrize(("given", "provider"), [("GCP", "gcp"), (" Aws ", "aws"),
                                                  ("Azure", "azure"), ("local", "local")])
def test_provider_is_normalised(given: str, provider: str) -> None:
    settings = load_settings(AgentSettings, {"PROVIDER": given})
    assert settings.provider == provider
    spot = load_settings(AgentSettings, {"PROVIDER": given, "SPOT_INSTANCE": "true"}
                         ) if provider != "local" else None
    if spot is not None:
        assert spot.spot_instance and spot.metadata_base.startswith("http://")
        detector = detector_for(spot.provider, spot.metadata_base)
        assert isinstance(detector, AwsSpot | GcpSpot | AzureSpot)
        assert detector.provider == provider


@pytest.mark.parametrize("provider", ["oracle", "local", "", "gcp-europe"])
def test_spot_on_a_cloud_without_detection_is_refused(provider: str) -> None:
    with pytest.raises(SettingsError, match="SPOT_INSTANCE=true: spot notices can only"):
        load_settings(AgentSettings, {"PROVIDER": provider, "SPOT_INSTANCE": "true"})
    with pytest.raises(ValueError, match="SPOT_INSTANCE=true"):
        AgentSettings(provider=provider, spot_instance=True)


def test_another_cloud_on_demand_registers_as_named() -> None:
    assert load_settings(AgentSettings, {"PROVIDER": "Lambda"}).provider == "lambda"


def test_the_agent_exits_2_on_a_spot_node_it_cannot_watch(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PROVIDER", "Oracle")
    monkeypatch.setenv("SPOT_INSTANCE", "true")
    assert main() == 2
    assert "PROVIDER 'oracle'" in capsys.readouterr().err


def test_sigterm_drain_fits_in_a_kubernetes_grace_period() -> None:
    defaults = AgentSettings()
    leaving = 5.0  # what the agent gives itself to publish after the drain
    assert defaults.sigterm_drain_timeout + leaving < 30 < defaults.drain_timeout
    assert load_settings(AgentSettings, {"SIGTERM_DRAIN_TIMEOUT": "7"}).sigterm_drain_timeout == 7
