"""Gateway workers (``imagegw worker``) as real processes against the session's Prefect server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from prefect.settings import PREFECT_API_URL

from deployments import work_pool_name
from imagegw.processes import log_tail
from tests.gateway_fixtures import Gateway

START_TIMEOUT = 90.0


def online_workers(api_url: str, platform: str) -> int:
    response = requests.post(f"{api_url}/work_pools/{work_pool_name(platform)}/workers/filter", json={}, timeout=5)
    return sum(1 for worker in response.json() if worker["status"] == "ONLINE")


@contextmanager
def running_workers(gateway: Gateway, platform: str, count: int, *, same_host: bool = False,
                    leave_runs: bool = False, **environment_overrides: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` workers of ``platform`` (standing in for as many hosts, each its own state directory, unless
    ``same_host``: then on the gateway's host, in its state directory), once they are online; killed with whatever
    they started when the block ends, and the runs they held set CRASHED unless ``leave_runs`` (a test of what the
    gateway does with them). ``environment_overrides``: more of their environment. Logs: ``worker-<n>.log``."""
    api_url = PREFECT_API_URL.value()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "IMAGEGW_"))}
    workers = []
    try:
        for number in range(1, count + 1):
            with open(gateway.root / f"worker-{number}.log", "wb") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "cli", "worker", "--platform", platform,
                     "--config", str(gateway.config_path)],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**environment, "PREFECT_API_URL": api_url, **environment_overrides,
                         **({} if same_host else {"IMAGEGW_STATE_DIR": str(gateway.root / f"worker-{number}-state")})}))
        deadline = time.monotonic() + START_TIMEOUT
        while online_workers(api_url, platform) < count:
            assert time.monotonic() < deadline, f"the {count} workers did not come online"
            assert all(worker.poll() is None for worker in workers), "a worker exited"
            time.sleep(0.5)
        try:
            yield workers
        except BaseException:
            # Shown with the failure: why a run did not start (another run holding the pool's slot, a worker that
            # never polled) is gone once the session's Prefect server stops.
            print(f"{platform}'s unfinished runs: {unfinished_runs(platform)}")
            for number in range(1, count + 1):
                print(f"--- worker-{number}.log, last lines:\n{log_tail(gateway.root / f'worker-{number}.log', 40)}")
            raise
    finally:
        for worker in workers:
            with_group_killed(worker)
        if not leave_runs:
            crash_runs_left_by(workers, platform)


def unfinished_runs(platform: str) -> list[str]:
    """The runs of the platform's pool not yet ended: each its state, queue, name and worker."""
    unfinished = {"work_pools": {"name": {"any_": [work_pool_name(platform)]}},
                  "flow_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING", "PAUSED"]}}}}
    runs = requests.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json=unfinished, timeout=10).json()
    return [f"{run['state_name']} in {run['work_queue_name']}: {run['name']} "
            f"(worker {run.get('labels', {}).get('prefect.worker.name')})" for run in runs]


def crash_runs_left_by(workers: list[subprocess.Popen[bytes]], platform: str) -> None:
    """Set CRASHED the runs the killed ``workers`` left PENDING or RUNNING, as the gateway does for a run whose
    heartbeat stopped. Nothing reports a killed worker's runs to Prefect: they would hold their pool's slots for
    the rest of the session, and a later test allowing one pull at a time would wait for a worker for ever."""
    api_url = PREFECT_API_URL.value()
    # Named as `imagegw worker` names them, by host and process (deployments.platforms).
    names = {f"{socket.gethostname()}-{worker.pid}-{platform}" for worker in workers}
    holding = {"work_pools": {"name": {"any_": [work_pool_name(platform)]}},
               "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}}
    runs = requests.post(f"{api_url}/flow_runs/filter", json=holding, timeout=10).json()
    for run in runs:
        if run.get("labels", {}).get("prefect.worker.name") in names:
            requests.post(f"{api_url}/flow_runs/{run['id']}/set_state", timeout=10, json={
                "state": {"type": "CRASHED", "message": "its worker was killed at the end of a test"},
                "force": True}).raise_for_status()


def with_group_killed(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
