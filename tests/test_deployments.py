"""Per-platform deployments of the pull flow."""

from __future__ import annotations

from deployments.platforms import platform_deployments
from tests.gateway_fixtures import Gateway


def test_every_platform_gets_a_deployment_bound_to_it(gateway: Gateway) -> None:
    deployments = {deployment.name: deployment for deployment in platform_deployments(gateway.settings)}

    assert set(deployments) == {"mycluster", "armcluster"}
    assert deployments["armcluster"].parameters == {"platform": "armcluster", "config": str(gateway.config_path)}
    assert deployments["mycluster"].tags == ["platform:mycluster"]


def test_a_worker_can_serve_only_some_platforms(gateway: Gateway) -> None:
    deployments = platform_deployments(gateway.settings, ["armcluster"])

    assert [deployment.name for deployment in deployments] == ["armcluster"]
