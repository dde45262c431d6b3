"""Per-platform work pools and deployments of the pull flow, registered with a real Prefect server."""

from __future__ import annotations

from prefect.client.orchestration import get_client

from deployments import deployment_name, work_pool_name
from deployments.platforms import MAINTENANCE_QUEUE, PULL_QUEUE, deploy_platforms
from flows import EXPIRE_FLOW, REFRESH_FLOW
from tests.gateway_fixtures import Gateway


def test_every_platform_gets_a_limited_pool_and_a_deployment_bound_to_it(gateway: Gateway) -> None:
    platforms = {"mycluster": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)}},
                 "armcluster": {"accesstype": "local", "local": {"imageDir": str(gateway.root / "arm")},
                                "maxConcurrentPulls": 3}}
    gateway.write_config(Platforms=platforms)

    done = deploy_platforms(gateway.settings)
    again = deploy_platforms(gateway.settings)  # idempotent

    assert sorted(done.deployed) == sorted(again.deployed) == ["armcluster", "mycluster"]
    with get_client(sync_client=True) as client:
        arm = client.read_deployment_by_name(deployment_name("armcluster"))
        assert arm.parameters == {"platform": "armcluster", "config": str(gateway.config_path)}
        assert arm.work_pool_name == work_pool_name("armcluster") and arm.tags == ["platform:armcluster"]
        # Each platform's pulls at most maxConcurrentPulls at once (2 by default), its scheduled runs one beside them.
        for platform, pulls in (("armcluster", 3), ("mycluster", 2)):
            pool = work_pool_name(platform)
            assert client.read_work_queue_by_name(PULL_QUEUE, work_pool_name=pool).concurrency_limit == pulls
            assert client.read_work_queue_by_name(MAINTENANCE_QUEUE, work_pool_name=pool).concurrency_limit == 1
            assert client.read_work_pool(pool).concurrency_limit == pulls + 1
        assert arm.work_queue_name == PULL_QUEUE
        expire = client.read_deployment_by_name(deployment_name("mycluster", EXPIRE_FLOW))
        assert (expire.work_pool_name, expire.work_queue_name) == (work_pool_name("mycluster"), MAINTENANCE_QUEUE)
        assert [schedule.schedule.cron for schedule in expire.schedules] == ["0 * * * *"]  # hourly by default
        refresh = client.read_deployment_by_name(deployment_name("mycluster", REFRESH_FLOW))
        assert (refresh.work_pool_name, refresh.work_queue_name) == (work_pool_name("mycluster"), MAINTENANCE_QUEUE)
        assert [schedule.schedule.cron for schedule in refresh.schedules] == ["*/15 * * * *"]


def test_a_platform_removed_from_the_configuration_loses_its_deployment(gateway: Gateway) -> None:
    gateway.write_config(Platforms={
        "keep": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)}},
        "drop": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)}}})
    deploy_platforms(gateway.settings)
    gateway.write_config(Platforms={"keep": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)}}})

    done = deploy_platforms(gateway.settings)

    assert "drop" in done.removed
    with get_client(sync_client=True) as client:
        names = {deployment.name for deployment in client.read_deployments()}
    assert "keep" in names and "drop" not in names
