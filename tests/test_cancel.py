"""Cancelling a pull from the Prefect UI, through a real Prefect server and a real worker.

The UI's Cancel sets the flow run CANCELLING; the worker running it sends SIGTERM to the run's process
group, and SIGKILL 30 s later if it still runs. The pull must be over long before that: its record
FAILURE, its scratch space gone, nothing published, and the tag free to be pulled again.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prefect.settings import PREFECT_API_URL

from deployments.launcher import DeploymentLauncher
from deployments.platforms import deploy_platforms
from imagegw.access import AclRequest
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import record_once
from tests.worker_fixtures import running_workers
from testsupport.images import LayerBuilder, push_image
from testsupport.throttle import ThrottlingProxy

ROOT = Caller(uid=0, gid=0)
RATE = 1 << 20
"""Bytes a second the registry sends while the pull is to be cancelled: a 1 MiB chunk of the download a second."""
LAYER_SIZE = 32 << 20
"""Random, so it does not compress: 32 s at RATE, so a pull that waits for its download cannot be on time."""
CANCEL_WITHIN = 10.0
"""The record must say FAILURE this soon after the Cancel: far before the heartbeat goes stale (180 s)."""
EXIT_WITHIN = 20.0
"""The run must be CANCELLED this soon after the Cancel: its process exited by itself, before the worker's
SIGKILL (30 s after its SIGTERM) would have cut its clean-up short."""
RETRY_FAILURES_AFTER = 2
"""PullUpdateTimeout: how long a FAILURE is shown to pollers before the tag can be pulled again."""


@pytest.fixture
def slow_registry(gateway: GatewayFixture) -> Iterator[ThrottlingProxy]:
    """The session's registry behind a relay that sends RATE bytes a second, configured as the default location."""
    with ThrottlingProxy(gateway.registry.host, RATE) as proxy:
        gateway.write_config(DefaultImageLocation=proxy.host, Locations={proxy.host: {"url": proxy.url}},
                             PullUpdateTimeout=RETRY_FAILURES_AFTER)
        deploy_platforms(gateway.settings)
        yield proxy


@pytest.fixture
def worker(gateway: GatewayFixture, slow_registry: ThrottlingProxy) -> Iterator[subprocess.Popen[bytes]]:
    with running_workers(gateway, "mycluster", 1) as workers:
        yield workers[0]


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f} s"
        time.sleep(0.2)


def cancel_as_the_ui_does(flow_run_id: str) -> None:
    """What the UI's Cancel button sends."""
    response = requests.post(f"{PREFECT_API_URL.value()}/flow_runs/{flow_run_id}/set_state",
                             json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}, timeout=10)
    response.raise_for_status()


def flow_run_state(flow_run_id: str) -> str:
    response = requests.get(f"{PREFECT_API_URL.value()}/flow_runs/{flow_run_id}", timeout=10)
    return str(response.json()["state_type"])


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")) if directory.exists() else []


def test_a_pull_cancelled_mid_download_fails_at_once_and_leaves_nothing_behind(
        gateway: GatewayFixture, slow_registry: ThrottlingProxy, worker: subprocess.Popen[bytes]) -> None:
    push_image(gateway.registry, "cancel/big", "1", [LayerBuilder().file("noise", os.urandom(LAYER_SIZE))])
    tag = f"{slow_registry.host}/cancel/big:1"
    key = PullKey("mycluster", "docker", tag)
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))
    store = gateway.store()
    scratch_parent = gateway.root / "expand"

    def pull_record() -> dict[str, Any]:
        return store.pull_record(key) or {}

    service.pull(ROOT, "mycluster", "docker", tag, AclRequest())
    record = record_once(pull_record, lambda record: record.get("status_message", "").startswith("Pulling layers: 0/1"),
                         "downloading", 60)
    assert files_under(scratch_parent), "the pull has no scratch directory to remove"

    cancel_as_the_ui_does(record["flow_run_id"])
    cancelled_at = time.monotonic()
    record = record_once(pull_record, lambda record: record.get("status") == "FAILURE", "FAILURE", CANCEL_WITHIN)
    failed_after = time.monotonic() - cancelled_at

    assert "cancelled by an operator" in record["status_message"]
    assert files_under(scratch_parent) == []
    assert files_under(gateway.image_dir) == []
    wait_for("the flow run CANCELLED", lambda: flow_run_state(record["flow_run_id"]) == "CANCELLED",
             cancelled_at + EXIT_WITHIN - time.monotonic())
    print(f"after the Cancel: FAILURE in {failed_after:.1f} s, CANCELLED in {time.monotonic() - cancelled_at:.1f} s")
    # The download stopped with the run, and removed its partial file.
    assert [name for name in files_under(gateway.cache_dir) if name.endswith(".partial")] == []

    slow_registry.rate = None
    time.sleep(max(0.0, cancelled_at + failed_after + RETRY_FAILURES_AFTER - time.monotonic()))
    service.pull(ROOT, "mycluster", "docker", tag, AclRequest())
    record = record_once(pull_record, lambda record: record.get("status") in ("READY", "FAILURE"), "done", 60)
    assert record["status"] == "READY", record["status_message"]
    assert (gateway.image_dir / f"{record['id']}.squashfs").is_file()
