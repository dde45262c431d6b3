"""A worker killed outright (SIGKILL: the OOM killer, a crashed host) in the middle of a pull, through a real
Prefect server, real ``imagegw worker`` processes, the real registry behind a throttling relay and the real
MongoDB-compatible store.

Prefect keeps the dead run RUNNING (nothing reports its end), so the gateway cannot learn of the death from
Prefect: the pull's record stops getting heartbeats, a poller is told so, and once it has been silent for
``StalePullTimeout`` the next request starts the pull again (Shifter's issue #242: a record PULLING forever),
and sets the dead run CRASHED, which frees its slot of the platform's ``maxConcurrentPulls`` (1 here: the new
run could not start otherwise). What the dead run wrote is left only under temporary names, and the next
worker to start on the host removes its scratch directory, whose lock died with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prefect.settings import PREFECT_API_URL

from deployments import work_pool_name, worker_name
from deployments.launcher import DeploymentLauncher
from deployments.platforms import PULL_QUEUE, deploy_platforms
from imagegw.access import AclRequest
from imagegw.errors import ImageNotFound
from imagegw.processes import descendants
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import record_once
from tests.squashfs_reader import read_tree
from tests.worker_fixtures import running_workers
from testsupport.images import LayerBuilder, push_image
from testsupport.throttle import ThrottlingProxy

ROOT = Caller(uid=0, gid=0)
RATE = 1 << 20
"""Bytes a second the registry sends until the worker is killed."""
LAYER_SIZE = 32 << 20
"""Random, so it does not compress: 32 s at RATE, so the pull is surely mid-download when it is killed."""
STALE_PULL_TIMEOUT = 15
"""StalePullTimeout: a record silent this long belongs to a dead run (heartbeats every 2.5 s)."""
HEARTBEAT_INTERVAL = STALE_PULL_TIMEOUT / 6
RUNNING_STAGES = ("PULLING", "EXAMINATION", "CONVERSION", "TRANSFER")
POLL_INTERVAL = 1.0
"""How often the test asks again, as ``shifterimg pull`` polls by repeating its pull request."""
WORKER_START = 90.0
"""A worker imports Prefect and registers with the server: seconds on a small host others share."""
MAX_CONCURRENT_PULLS = 1
"""The platform's pulls running at once: the dead run holds the only slot until it is set CRASHED."""


@pytest.fixture
def slow_registry(gateway: GatewayFixture) -> Iterator[ThrottlingProxy]:
    """The session's registry behind a relay that sends RATE bytes a second, configured as the default location."""
    platforms = json.loads(gateway.config_path.read_text())["Platforms"]
    platforms["mycluster"]["maxConcurrentPulls"] = MAX_CONCURRENT_PULLS
    with ThrottlingProxy(gateway.registry.host, RATE) as proxy:
        gateway.write_config(DefaultImageLocation=proxy.host, Locations={proxy.host: {"url": proxy.url}},
                             StalePullTimeout=STALE_PULL_TIMEOUT, Platforms=platforms)
        deploy_platforms(gateway.settings)
        yield proxy


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_with_its_runs(worker: subprocess.Popen[bytes]) -> set[int]:
    """SIGKILL the worker's process group and those of everything below it (a flow run may be in a session of
    its own), as the OOM killer taking the host's gateway down, or the host's crash, would; the pids killed."""
    victims = {worker.pid} | descendants(worker.pid)
    for pid in victims:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in victims):
        assert time.monotonic() < deadline, "the killed worker's processes did not die"
        time.sleep(0.1)
    return victims


def worker_online(pid: int, platform: str) -> bool:
    """Whether the Prefect server counts the worker of process ``pid`` online (named as run_workers names it)."""
    name = worker_name(platform, pid)
    response = requests.post(f"{PREFECT_API_URL.value()}/work_pools/{work_pool_name(platform)}/workers/filter",
                             json={}, timeout=10)
    return any(worker["name"] == name and worker["status"] == "ONLINE" for worker in response.json())


def flow_run_state(flow_run_id: str) -> tuple[str, str]:
    """The run's state type and message, as the Prefect UI shows them."""
    response = requests.get(f"{PREFECT_API_URL.value()}/flow_runs/{flow_run_id}", timeout=10)
    state = response.json()["state"]
    return str(state["type"]), str(state.get("message") or "")


def pool_slots_taken(platform: str) -> int:
    """How many of the platform's maxConcurrentPulls its pulls' PENDING and RUNNING runs hold."""
    api = PREFECT_API_URL.value()
    pool = work_pool_name(platform)
    queue = requests.get(f"{api}/work_pools/{pool}/queues/{PULL_QUEUE}", timeout=10).json()
    assert queue["concurrency_limit"] == MAX_CONCURRENT_PULLS
    holding = {"work_pools": {"name": {"any_": [pool]}}, "work_pool_queues": {"name": {"any_": [PULL_QUEUE]}},
               "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}}
    return int(requests.post(f"{api}/flow_runs/count", json=holding, timeout=10).json())


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")) if directory.exists() else []


def scratch_directories(expand: Path) -> list[Path]:
    return sorted(expand.glob("pull-*"))


def test_a_pull_whose_worker_is_killed_is_taken_over_by_a_later_request_and_leaves_nothing_behind(
        gateway: GatewayFixture, slow_registry: ThrottlingProxy) -> None:
    noise = os.urandom(LAYER_SIZE)
    push_image(gateway.registry, "killed/big", "1", [LayerBuilder().file("noise", noise)])
    tag = f"{slow_registry.host}/killed/big:1"
    key = PullKey("mycluster", "docker", tag)
    service = Gateway(gateway.settings, DeploymentLauncher(gateway.settings))
    store = gateway.store()
    expand = gateway.root / "expand"

    def request() -> dict[str, Any]:
        return service.pull(ROOT, "mycluster", "docker", tag, AclRequest())

    def pull_record() -> dict[str, Any]:
        return store.pull_record(key) or {}

    with running_workers(gateway, "mycluster", 1, leave_runs=True) as workers:
        assert request()["status"] in ("INIT", "PENDING")
        first = record_once(pull_record, lambda record: record.get("status_message", "").startswith(
            "Pulling layers: 0/1"), "downloading", 120)
        assert len(scratch_directories(expand)) == 1, files_under(expand)
        killed = kill_with_its_runs(workers[0])
    killed_at = time.monotonic()
    assert len(killed) > 1, "the worker had no flow run process to kill"
    slow_registry.rate = None

    # The user: no image yet, and the pull still shown at the stage it reached, not failed.
    with pytest.raises(ImageNotFound):
        service.lookup(ROOT, "mycluster", "docker", tag)
    assert request()["status"] in RUNNING_STAGES
    # The record: the dead run's stage, its heartbeat stopped. Prefect keeps the run RUNNING, in the only slot.
    record = pull_record()
    assert record["status"] in RUNNING_STAGES and record["flow_run_id"] == first["flow_run_id"]
    assert flow_run_state(first["flow_run_id"])[0] == "RUNNING"
    assert pool_slots_taken("mycluster") == 1
    # The disk: nothing under a final name in the image directory; the dead pull's scratch is still there.
    assert files_under(gateway.image_dir) == []
    [dead_scratch] = scratch_directories(expand)
    assert [name for name in files_under(gateway.cache_dir) if name.endswith(".partial")], "no partial download left"

    # Polling as shifterimg does, by repeating the pull request: the dead run's stage until the record has been
    # silent for StalePullTimeout (saying so once two heartbeats are missed), then a request takes the pull over.
    seen = poll(request, lambda response: response["status"] not in RUNNING_STAGES, killed_at,
                STALE_PULL_TIMEOUT + 60)
    reclaimed_after, reclaimed = seen[-1]
    before = [response for _, response in seen[:-1]]
    assert before and all(response["status"] in RUNNING_STAGES for response in before)
    silent = [response["status_message"] for response in before
              if "no heartbeat from its run" in response["status_message"]]
    assert silent, [response["status_message"] for response in before]
    assert "it may have died; a request after" in silent[-1] and "starts the pull again" in silent[-1]
    # Not before the record was silent for StalePullTimeout (its last beat at most one interval before the kill).
    assert reclaimed_after >= STALE_PULL_TIMEOUT - HEARTBEAT_INTERVAL - 1
    # No worker runs yet: the new flow run waits for one, and says so.
    assert (reclaimed["status"], reclaimed["status_message"]) == ("PENDING", "Waiting for a worker")
    record = pull_record()
    assert record["flow_run_id"] != first["flow_run_id"] and record["pull_id"] != first["pull_id"]
    assert dead_scratch.exists()
    # Prefect: the dead run is CRASHED, saying why and by which run it was replaced; its slot is free.
    state, message = flow_run_state(first["flow_run_id"])
    assert state == "CRASHED", (state, message)
    assert message.startswith(f"its worker stopped beating the heartbeat of the pull of {tag} for mycluster for "), \
        message
    silent_for = float(message.split(" for mycluster for ")[1].split(" s ")[0])
    assert STALE_PULL_TIMEOUT <= silent_for <= reclaimed_after + HEARTBEAT_INTERVAL + 1, message
    assert message.endswith(f"s (StalePullTimeout): the pull was taken over by flow run {record['flow_run_id']}")
    assert pool_slots_taken("mycluster") == 0

    # The next worker on the host removes the dead pull's scratch directory and partial download as it starts,
    # then runs the new flow run.
    with running_workers(gateway, "mycluster", 1) as workers:
        deadline = time.monotonic() + WORKER_START
        while not worker_online(workers[0].pid, "mycluster"):
            assert time.monotonic() < deadline, "the new worker did not come online"
            time.sleep(0.5)
        restarted_after = time.monotonic() - killed_at
        assert not dead_scratch.exists()
        seen = poll(request, lambda response: response["status"] in ("READY", "FAILURE"), killed_at,
                    restarted_after + 180)
        # READY comes at the index stage; the run completes a moment later, after its report, while its worker lives.
        deadline = time.monotonic() + 30
        while (new_run_state := flow_run_state(pull_record()["flow_run_id"])[0]) not in ("COMPLETED", "FAILED"):
            assert time.monotonic() < deadline, f"the new flow run is {new_run_state} 30 s after READY"
            time.sleep(0.5)
    ready_after, ready = seen[-1]
    print(f"after the kill: taken over by a request in {reclaimed_after:.1f} s (StalePullTimeout {STALE_PULL_TIMEOUT} "
          f"s), a new worker online in {restarted_after:.1f} s, READY in {ready_after:.1f} s")

    # The user: READY, and the lookup finds the image.
    assert (ready["status"], ready["status_message"]) == ("READY", "Image ready")
    image = service.lookup(ROOT, "mycluster", "docker", tag)
    assert image["status"] == "READY"
    # The record: READY by the new flow run, which had the platform's one slot; the killed one stays CRASHED.
    assert pull_record()["status"] == "READY" and pull_record()["flow_run_id"] == record["flow_run_id"]
    assert new_run_state == "COMPLETED"
    assert flow_run_state(first["flow_run_id"]) == (state, message)
    # The disk: the image and its .meta under their final names only, whole; no scratch, no partial download.
    assert files_under(gateway.image_dir) == sorted([f"{image['id']}.meta", f"{image['id']}.squashfs"])
    assert read_tree(gateway.image_dir / f"{image['id']}.squashfs")["noise"].data == noise
    assert files_under(expand) == []
    assert [name for name in files_under(gateway.cache_dir) if name.endswith(".partial")] == []


def poll(request: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], since: float,
         timeout: float) -> list[tuple[float, dict[str, Any]]]:
    """The answers to ``request`` repeated every POLL_INTERVAL until one is ``done``, each with the seconds
    since ``since``; fails after ``timeout`` seconds since then, naming the last answer."""
    seen: list[tuple[float, dict[str, Any]]] = []
    while not seen or not done(seen[-1][1]):
        assert time.monotonic() - since < timeout, f"not done within {timeout:.0f} s: {seen[-1] if seen else None}"
        if seen:
            time.sleep(POLL_INTERVAL)
        seen.append((time.monotonic() - since, request()))
    return seen
