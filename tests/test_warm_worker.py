"""A pull's flow run starts warm: forked from the worker's fork server, which imported Prefect and the flows when the
worker started (``deployments.warmworker``), through a real worker, Prefect server and registry; and it is still a
whole Prefect run, its task runs and logs recorded."""

from __future__ import annotations

import contextlib
import contextvars
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL, Settings, get_current_settings, temporary_settings
from prefect.states import Suspended

from deployments import work_pool_name, worker_name
from deployments.launcher import DeploymentLauncher
from deployments.platforms import deploy_platforms
from deployments.warmworker import _SettingsEnvironment, entered_beside
from imagegw.access import AclRequest
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.worker_fixtures import running_workers
from testsupport.images import LayerBuilder, push_image
from testsupport.throttle import ThrottlingProxy

ROOT = Caller(uid=0, gid=0)
RATE = 1 << 20
"""Bytes a second the registry sends until the run's process has been looked at."""
LAYER_SIZE = 8 << 20
"""Random, so it does not compress: 8 s at RATE, long enough to find the run's process while it runs."""


@pytest.fixture
def slow_registry(gateway: GatewayFixture) -> Iterator[ThrottlingProxy]:
    """The session's registry behind a relay that sends RATE bytes a second, configured as the default location."""
    with ThrottlingProxy(gateway.registry.host, RATE) as proxy:
        gateway.write_config(DefaultImageLocation=proxy.host, Locations={proxy.host: {"url": proxy.url}})
        deploy_platforms(gateway.settings)
        yield proxy


@pytest.fixture
def worker(gateway: GatewayFixture, slow_registry: ThrottlingProxy) -> Iterator[subprocess.Popen[bytes]]:
    with running_workers(gateway, "mycluster", 1) as workers:
        yield workers[0]


def wait_for(what: str, value: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := value()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_a_pull_runs_in_a_process_forked_from_the_warm_server_and_shows_its_task_runs(
        gateway: GatewayFixture, slow_registry: ThrottlingProxy, worker: subprocess.Popen[bytes]) -> None:
    push_image(gateway.registry, "warm/app", "1", [LayerBuilder().file("noise", os.urandom(LAYER_SIZE))])
    tag = f"{slow_registry.host}/warm/app:1"
    key = PullKey("mycluster", "docker", tag)
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))
    store = gateway.store()

    service.pull(ROOT, "mycluster", "docker", tag, AclRequest())
    flow_run_id = wait_for("flow run", lambda: (store.pull_record(key) or {}).get("flow_run_id"), 30)
    # The worker records the pid of the run's process on the flow run (what a cancel signals).
    pid = int(wait_for("run process", lambda: requests.get(
        f"{PREFECT_API_URL.value()}/flow_runs/{flow_run_id}", timeout=10).json().get("infrastructure_pid"), 60))

    # Its parent is the fork server the worker started, not the worker: no new interpreter was started for it.
    server = parent_of(pid)
    assert server != worker.pid and parent_of(server) == worker.pid
    assert "multiprocessing.forkserver" in command_line(server)
    assert command_line(pid) == command_line(server)  # forked, not `python -m prefect.engine`
    # It leads a process group of its own, which a cancel signals whole.
    assert os.getpgid(pid) == pid != os.getpgid(worker.pid)

    slow_registry.rate = None
    record = wait_for("end of the pull", lambda: (r := store.pull_record(key) or {}).get("status") in (
        "READY", "FAILURE") and r, 60)
    assert record["status"] == "READY", record["status_message"]

    with get_client(sync_client=True) as client:
        ours = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))

        def stages() -> set[str]:  # the server records task runs from events, a moment later
            names = {run.name.rsplit("-", 1)[0] for run in client.read_task_runs(flow_run_filter=ours)}
            return names if {"pull", "unpack", "squash", "transfer", "index"} <= names else set()

        wait_for("task runs of every stage", stages, 30)
        wait_for("completed flow run", lambda: client.read_flow_run(flow_run_id).state_type.value == "COMPLETED", 30)
        # The UI names the worker that ran it (and tests.worker_fixtures finds the runs of a killed worker by it).
        labels = client.read_flow_run(flow_run_id).labels
        assert labels["prefect.worker.name"] == worker_name("mycluster", worker.pid)
        assert labels["prefect.work-pool.name"] == work_pool_name("mycluster")
        ours_logged = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))

        def run_logs() -> list[Any]:  # the run's process ships its logs in batches, which may arrive after its state
            logs = client.read_logs(ours_logged)
            return logs if any("Beginning flow run" in log.message for log in logs) else []

        logs = wait_for("the run's logs", run_logs, 30)
        # The flow came from the fork server's modules, not from reading the deployment and running its pull step.
        assert not any("pull step" in log.message for log in logs)


def test_a_pull_suspended_from_the_api_stops_like_a_cancelled_one(
        gateway: GatewayFixture, slow_registry: ThrottlingProxy, worker: subprocess.Popen[bytes]) -> None:
    # The run watches for a suspension beside the pull, not before it starts (deployments.warmworker): it still sees it.
    push_image(gateway.registry, "warm/suspended", "1", [LayerBuilder().file("noise", os.urandom(LAYER_SIZE))])
    tag = f"{slow_registry.host}/warm/suspended:1"
    key = PullKey("mycluster", "docker", tag)
    store = gateway.store()
    Gateway(gateway.settings, DeploymentLauncher(gateway.settings)).pull(ROOT, "mycluster", "docker", tag, AclRequest())
    flow_run_id = wait_for("flow run", lambda: (store.pull_record(key) or {}).get("flow_run_id"), 30)
    wait_for("download", lambda: "layers" in (store.pull_record(key) or {}).get("status_message", ""), 60)

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Suspended(timeout_seconds=300), force=True)
        slow_registry.rate = None  # left to itself, the pull would now be READY in a moment
        record = wait_for("end of the pull", lambda: (r := store.pull_record(key) or {}).get("status") in (
            "READY", "FAILURE") and r, 60)
        assert record["status"] == "FAILURE"
        assert "cancelled by an operator" in record["status_message"]
        assert client.read_flow_run(flow_run_id).state_name == "Suspended"
    assert not list(gateway.settings.platform("mycluster").image_dir.glob("*.squashfs"))


def test_a_watch_entered_beside_a_block_does_not_hold_it_up_and_is_left_after_it() -> None:
    # What the run's process does with Prefect's watch for a suspension: entering it waits for the server.
    subscribed = threading.Event()
    seen: list[str] = []
    caller = contextvars.ContextVar("caller", default="none")

    @contextlib.contextmanager
    def watch(flow_run: str) -> Iterator[None]:
        subscribed.wait(10)
        seen.append(f"watching {flow_run} for {caller.get()}")
        yield
        seen.append("stopped watching")

    caller.set("the run")
    with entered_beside(watch)("run 1"):
        seen.append("run started")
        subscribed.set()
    assert seen == ["run started", "watching run 1 for the run", "stopped watching"]


def test_each_run_gets_prefects_settings_as_its_environment_made_once_per_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    expected = get_current_settings().to_environment_variables(exclude_unset=True)
    made: list[Settings] = []
    make = Settings.to_environment_variables

    def counted(settings: Settings, **options: Any) -> dict[str, str]:
        made.append(settings)
        return make(settings, **options)

    monkeypatch.setattr(Settings, "to_environment_variables", counted)
    environment = _SettingsEnvironment()
    environment()["PREFECT_API_URL"] = "changed by one run"
    assert environment() == expected
    assert len(made) == 1
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert environment()["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
