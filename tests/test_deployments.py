"""Per-platform deployments of the pull flow."""

from __future__ import annotations

from deployments.platforms import platform_deployments
from tests.gateway_fixtures import Gateway


def test_every_platform_gets_a_deployment_bound_to_it(gateway: Gateway) -> None:
    deployments = {deployment.name: deployment for deployment in platform_deployments(gateway.settings)}

    assert set(deployments) == {"mycluster", "armcluster"}
    assert deployments["armcluster"].parameters == {"platform": "armcluster", "config": str(gateway.config_path)}
    assert deployments["mycluster"].tags == ["platform:mycluster"]
