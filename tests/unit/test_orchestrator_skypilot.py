"""The SkyPilot launcher's mapping of SkyPilot's answers, offline, against the installed
SkyPilot's own types: cluster records to states, exceptions to launch errors, and the status
request it makes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sky
import sky.exceptions
from sky.schemas.api.responses import StatusResponse
from sky.utils.status_lib import ClusterStatus

from services.orchestrator import skypilot_launcher
from services.orchestrator.launcher import ClusterState, cluster_name
from services.orchestrator.skypilot_launcher import cluster_states, launch_error

PREFIX = "crosslogic"


def record(name: str, status: ClusterStatus) -> StatusResponse:
    return StatusResponse(name=name, launched_at=0, status=status, autostop=-1, to_down=False,
                          cluster_hash="h", cluster_ever_up=True, user_hash="u1",
                          user_name="someone-else", workspace="default", is_managed=False,
                          nodes=1)


@pytest.mark.parametrize(("status", "state"), [
    (ClusterStatus.UP, ClusterState.UP),
    (ClusterStatus.INIT, ClusterState.STARTING),
    (ClusterStatus.PENDING, ClusterState.STARTING),
    (ClusterStatus.STOPPED, ClusterState.STOPPED),
    (ClusterStatus.AUTOSTOPPING, ClusterState.STOPPED),
])
def test_every_skypilot_status_maps(status: ClusterStatus, state: ClusterState) -> None:
    assert cluster_states([record("crosslogic-llama-us-east-1-1a2b3c4d", status)], PREFIX) == {
        "crosslogic-llama-us-east-1-1a2b3c4d": state}


def test_every_skypilot_status_is_known() -> None:
    # A status SkyPilot adds later shows as "starting" (not gone); this says when to look.
    assert {s.value for s in ClusterStatus} == set(skypilot_launcher._STATES)


def test_other_clusters_are_not_ours() -> None:
    records = [record("crosslogic-a-1", ClusterStatus.UP), record("dev-box", ClusterStatus.UP),
               record("sky-serve-controller-1", ClusterStatus.UP),
               record("crosslogic2-a-1", ClusterStatus.UP),  # another platform's prefix
               record("crosslogic", ClusterStatus.UP)]
    assert set(cluster_states(records, PREFIX)) == {"crosslogic-a-1"}


def test_clusters_are_recognised_by_the_prefix_they_were_named_with() -> None:
    # CLUSTER_PREFIX as the operator wrote it; cluster names carry it normalised.
    name = cluster_name("CrossLogic_Prod", "m", "us-east-1", uuid.uuid4())
    assert name.startswith("crosslogic-prod-")
    records = [record(name, ClusterStatus.UP), record("crosslogic-a-1", ClusterStatus.UP)]
    assert cluster_states(records, "CrossLogic_Prod") == {name: ClusterState.UP}


def test_plain_dict_records_and_unknown_statuses() -> None:
    records: list[Any] = [{"name": "crosslogic-a-1", "status": "UP"},
                          {"name": "crosslogic-a-2", "status": "SOMETHING_NEW"}]
    assert cluster_states(records, PREFIX) == {"crosslogic-a-1": ClusterState.UP,
                                               "crosslogic-a-2": ClusterState.STARTING}


def test_no_resources_is_a_capacity_error() -> None:
    err = launch_error(sky.exceptions.ResourcesUnavailableError(
        "Failed to provision all possible launchable resources"))
    assert err.capacity
    assert "ResourcesUnavailableError" in str(err)


def test_no_resources_without_failover_is_an_error() -> None:
    err = launch_error(sky.exceptions.ResourcesUnavailableError("mismatch", no_failover=True))
    assert not err.capacity


@pytest.mark.parametrize("exc", [
    sky.exceptions.InvalidCloudCredentials("expired"),
    sky.exceptions.NoCloudAccessError("no cloud enabled"),
    sky.exceptions.ApiServerConnectionError("http://sky:46580"),
    sky.exceptions.ProvisionPrechecksError([ValueError("quota")]),
    RuntimeError("anything else"),
], ids=lambda e: type(e).__name__)
def test_other_failures_are_errors(exc: Exception) -> None:
    err = launch_error(exc)
    assert not err.capacity
    assert type(exc).__name__ in str(err)


def test_status_asks_for_every_users_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    # No API server here: the two SDK calls are stood in for, with the signature checked
    # against the installed SkyPilot.
    import inspect

    assert "all_users" in inspect.signature(sky.status).parameters
    asked: dict[str, Any] = {}

    def status(**kwargs: Any) -> str:
        asked.update(kwargs)
        return "request-1"

    def get(request_id: str) -> list[StatusResponse]:
        assert request_id == "request-1"
        return [record("crosslogic-a-1", ClusterStatus.UP)]

    monkeypatch.setattr(sky, "status", status)
    monkeypatch.setattr(sky, "get", get)
    assert skypilot_launcher._status(PREFIX) == {"crosslogic-a-1": ClusterState.UP}
    assert asked == {"refresh": sky.StatusRefreshMode.AUTO, "all_users": True}
