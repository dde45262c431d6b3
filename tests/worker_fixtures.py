"""Gateway workers (``imagegw worker``) as real processes against the session's Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from prefect.settings import PREFECT_API_URL

from deployments import work_pool_name
from tests.gateway_fixtures import Gateway

START_TIMEOUT = 90.0


def online_workers(api_url: str, platform: str) -> int:
    response = requests.post(f"{api_url}/work_pools/{work_pool_name(platform)}/workers/filter", json={}, timeout=5)
    return sum(1 for worker in response.json() if worker["status"] == "ONLINE")


@contextmanager
def running_workers(gateway: Gateway, platform: str, count: int, *, same_host: bool = False,
                    **environment_overrides: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` workers of ``platform`` (standing in for as many hosts, each its own state directory, unless
    ``same_host``: then on the gateway's host, in its state directory), once they are online; killed with whatever
    they started when the block ends. ``environment_overrides``: more of their environment. Logs: ``worker-<n>.log``."""
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
        yield workers
    finally:
        for worker in workers:
            with_group_killed(worker)


def with_group_killed(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
