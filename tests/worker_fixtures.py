"""Gateway workers (``imagegw worker``) as real processes against the session's Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from prefect.settings import PREFECT_API_URL

from deployments import work_pool_name, worker_name
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


def pool_runs(platform: str, *states: str) -> list[dict[str, Any]]:
    """The runs of the platform's pool in any of the state types ``states``, as Prefect's API gives them."""
    wanted = {"work_pools": {"name": {"any_": [work_pool_name(platform)]}},
              "flow_runs": {"state": {"type": {"any_": list(states)}}}}
    runs: list[dict[str, Any]] = requests.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json=wanted,
                                               timeout=10).json()
    return runs


def unfinished_runs(platform: str) -> list[str]:
    """The runs of the platform's pool not yet ended: each its state, queue, name and worker."""
    return [f"{run['state_name']} in {run['work_queue_name']}: {run['name']} (worker {_worker_of(run)})"
            for run in pool_runs(platform, "SCHEDULED", "PENDING", "RUNNING", "PAUSED")]


def crash_runs_left_by(workers: list[subprocess.Popen[bytes]], platform: str) -> None:
    """Set CRASHED the runs the killed ``workers`` left PENDING or RUNNING, as the gateway does for a run whose
    heartbeat stopped. Nothing reports a killed worker's runs to Prefect: they would hold their pool's slots until a
    later test's worker handed them on (``deployments.orphans``), and that test would wait for them, or run them.

    A run PENDING that no worker has named yet was being submitted when its worker was killed (a worker names a run
    just after making it PENDING), and no other test's worker runs meanwhile: it is one of theirs too."""
    names = {worker_name(platform, worker.pid) for worker in workers}
    for run in pool_runs(platform, "PENDING", "RUNNING"):
        if _worker_of(run) in names or (run["state_type"] == "PENDING" and _worker_of(run) is None):
            requests.post(f"{PREFECT_API_URL.value()}/flow_runs/{run['id']}/set_state", timeout=10, json={
                "state": {"type": "CRASHED", "message": "its worker was killed at the end of a test"},
                "force": True}).raise_for_status()


def _worker_of(run: dict[str, Any]) -> str | None:
    """The name of the worker that took ``run`` (Prefect's label), if one did."""
    name: str | None = run.get("labels", {}).get("prefect.worker.name")
    return name


def with_group_killed(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
