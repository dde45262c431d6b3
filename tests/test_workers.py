"""Two workers (standing in for two hosts) share one platform's work pool: every pull runs once, and
never more at once than the platform allows."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Running

from deployments import deployment_name, doorbell
from deployments.launcher import DeploymentLauncher
from deployments.platforms import deploy_platforms
from flows import REFRESH_FLOW
from imagegw.access import AclRequest
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import record_once
from tests.worker_fixtures import running_workers
from testsupport.images import LayerBuilder, push_image

IMAGES = 10
LIMIT = 2
ROOT = Caller(uid=0, gid=0)


def peak_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    """The most runs that were running at one moment, from their (start, end) times."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, change in edges:  # an end sorts before a start at the same instant
        running += change
        peak = max(peak, running)
    return peak


@pytest.fixture
def two_workers(gateway: GatewayFixture) -> Iterator[list[subprocess.Popen[bytes]]]:
    with running_workers(gateway, "mycluster", 2) as workers:
        yield workers


@pytest.fixture
def deployed(gateway: GatewayFixture) -> GatewayFixture:
    gateway.write_config(Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)},
                                                  "admins": ["root"], "maxConcurrentPulls": LIMIT}})
    deploy_platforms(gateway.settings)
    return gateway


def test_two_workers_share_a_platform_and_never_exceed_its_limit(
        deployed: GatewayFixture, two_workers: list[subprocess.Popen[bytes]]) -> None:
    gateway = deployed
    tags = []
    for number in range(IMAGES):
        push_image(gateway.registry, f"workers/image{number}", "1", [LayerBuilder().file("n", str(number).encode())])
        tags.append(gateway.image(f"workers/image{number}:1"))
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))

    for tag in tags:  # at once: each request only creates a flow run
        service.pull(ROOT, "mycluster", "docker", tag, AclRequest())

    store = gateway.store()
    deadline = time.monotonic() + 300
    records = {}
    while time.monotonic() < deadline:
        records = {tag: store.pull_record(PullKey("mycluster", "docker", tag)) or {} for tag in tags}
        if all(record.get("status") in ("READY", "FAILURE") for record in records.values()):
            break
        time.sleep(1)
    assert {tag: record.get("status") for tag, record in records.items()} == {tag: "READY" for tag in tags}, \
        {tag: record.get("status_message") for tag, record in records.items()}

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name("mycluster"))
        # The session's server also holds other tests' runs: only this deployment's are read. A run ends a
        # moment after its pull is READY (its report is written, its process exits), and on a busy host later.
        deadline = time.monotonic() + 60
        while True:
            # Earlier tests of the session may have run pulls on this deployment too: only this test's images count.
            runs = [run for run in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                if run.parameters.get("image") in tags]
            if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ours = FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in runs]))
        deadline = time.monotonic() + 20  # the server records task runs from events, a moment later
        while True:
            squashes = [run for run in client.read_task_runs(flow_run_filter=ours) if run.name.startswith("squash")]
            if len(squashes) >= IMAGES or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert sorted(run.parameters["image"] for run in runs) == sorted(tags)  # one run an image
    assert {run.state_type.value for run in runs} == {"COMPLETED"}
    assert len(squashes) == IMAGES  # each image converted exactly once
    peak = peak_overlap([(run.start_time, run.end_time) for run in runs])
    print(f"peak concurrent pulls: {peak} (limit {LIMIT}, {IMAGES} images, 2 workers)")
    assert 1 <= peak <= LIMIT

    submitted = [(gateway.root / f"worker-{number}.log").read_text().count("submitted to infrastructure")
                 for number in (1, 2)]
    print(f"flow runs each worker started: {submitted}")


def test_a_pull_reaches_a_worker_on_the_gateways_host_at_once_not_at_its_next_poll(deployed: GatewayFixture) -> None:
    gateway = deployed
    push_image(gateway.registry, "workers/bell", "1", [LayerBuilder().file("b", b"bell")])
    tag = gateway.image("workers/bell:1")
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))
    doorbells = gateway.settings.state_dir / doorbell.DOORBELLS
    # Polling once a minute: only the doorbell can bring the run to it within seconds.
    with running_workers(gateway, "mycluster", 1, same_host=True, PREFECT_WORKER_QUERY_SECONDS="60"):
        # Online may be other tests' workers, just killed, that Prefect still counts: wait for this one's doorbell.
        deadline = time.monotonic() + 60
        while not list(doorbells.glob("mycluster@*")):
            assert time.monotonic() < deadline, "the worker hung no doorbell"
            time.sleep(0.2)
        time.sleep(3)  # past the poll the worker makes as it starts

        service.pull(ROOT, "mycluster", "docker", tag, AclRequest())
        record = record_once(lambda: gateway.store().pull_record(PullKey("mycluster", "docker", tag)) or {},
                             lambda record: record.get("status") in ("READY", "FAILURE"), "end of the pull", 20)
        assert record["status"] == "READY", record.get("status_message")

    # Killed outright, the worker left its doorbell: the next ring finds it dead and removes it.
    assert doorbell.ring(gateway.settings.state_dir, "mycluster") == 0
    assert list(doorbells.glob("mycluster@*")) == []


def test_a_pull_does_not_wait_for_a_scheduled_run_that_holds_the_platforms_maintenance_slot(
        gateway: GatewayFixture) -> None:
    gateway.write_config(Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)},
                                                  "admins": ["root"], "maxConcurrentPulls": 1}})
    deploy_platforms(gateway.settings)
    push_image(gateway.registry, "workers/beside", "1", [LayerBuilder().file("b", b"beside a refresh")])
    tag = gateway.image("workers/beside:1")
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))
    with get_client(sync_client=True) as client:
        # A refresh working through hundreds of tags, as far as Prefect's limits see it: running, for minutes.
        refresh = client.read_deployment_by_name(deployment_name("mycluster", REFRESH_FLOW))
        long_refresh = client.create_flow_run_from_deployment(refresh.id, state=Running())
        ended_by_this_test = [long_refresh.id]  # the server is the session's: no run of ours may hold its slots
        try:
            with running_workers(gateway, "mycluster", 1, same_host=True):
                service.pull(ROOT, "mycluster", "docker", tag, AclRequest())
                record = record_once(lambda: gateway.store().pull_record(PullKey("mycluster", "docker", tag)) or {},
                                     lambda record: record.get("status") in ("READY", "FAILURE"), "end of the pull",
                                     60)
                assert record["status"] == "READY", record.get("status_message")
                # Nor does a second scheduled run (a schedule missed while the server was down) join the first.
                second = client.create_flow_run_from_deployment(refresh.id)
                ended_by_this_test.append(second.id)
                time.sleep(5)
                assert client.read_flow_run(second.id).state_type == StateType.SCHEDULED
        finally:
            for run_id in ended_by_this_test:
                client.set_flow_run_state(run_id, Cancelled(), force=True)
