"""Runs a killed worker left behind are handed on by its pool's live workers (``deployments.orphans``): never
started, they are scheduled again and their pulls complete with nobody asking; left running on this host, they are
set CRASHED, freeing their slots. Through a real Prefect server, a real ``imagegw worker``, registry and store."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pymongo
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed, Pending, Running, Scheduled, State

from deployments import worker_name, worker_pid_on_this_host
from deployments.launcher import DeploymentLauncher
from deployments.orphans import SUBMISSION_GRACE, SWEEP_INTERVAL, WORKER_LABEL, PullSilence, orphaned_runs
from deployments.platforms import deploy_platforms
from imagegw.access import AclRequest
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import record_once
from tests.worker_fixtures import running_workers
from testsupport.images import LayerBuilder, push_image

ROOT = Caller(uid=0, gid=0)
PLATFORM = "mycluster"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
LONG_AGO = NOW - SUBMISSION_GRACE - timedelta(seconds=1)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def flow_run(state: State[Any], worker: str | None = None) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), name="a-run", flow_id=uuid.uuid4(), state=state,
                   labels={WORKER_LABEL: worker} if worker else {})


def no_silence(run: FlowRun) -> float | None:
    return None


def orphans_of(*runs: FlowRun, online: tuple[str, ...] = (), pull_silence: PullSilence = no_silence) -> list[FlowRun]:
    found = {orphan.run_id for orphan in orphaned_runs(runs, PLATFORM, online, NOW, pull_silence)}
    return [run for run in runs if run.id in found]


def test_a_worker_name_of_this_host_gives_its_pid_and_no_other_does() -> None:
    assert worker_pid_on_this_host(worker_name(PLATFORM, 4242), PLATFORM) == 4242
    assert worker_pid_on_this_host(worker_name("other-cluster", 4242), PLATFORM) is None
    assert worker_pid_on_this_host(f"elsewhere-4242-{PLATFORM}", PLATFORM) is None
    assert worker_pid_on_this_host("a-name-an-operator-chose", PLATFORM) is None


def test_runs_taken_by_a_dead_worker_of_this_host_are_orphans_and_those_of_a_live_one_are_not() -> None:
    dead, live = worker_name(PLATFORM, dead_pid()), worker_name(PLATFORM, os.getpid())
    never_started = flow_run(Pending(timestamp=LONG_AGO), dead)
    submitting = flow_run(Pending(name="Submitting", timestamp=LONG_AGO), dead)
    died_running = flow_run(Running(timestamp=LONG_AGO), dead)
    running_just_now = flow_run(Running(timestamp=NOW), dead)
    pending_live = flow_run(Pending(timestamp=LONG_AGO), live)
    running_live = flow_run(Running(timestamp=LONG_AGO), live)
    assert orphans_of(never_started, submitting, died_running, running_just_now, pending_live, running_live) == [
        never_started, submitting, died_running, running_just_now]
    [orphan] = orphaned_runs([died_running], PLATFORM, (), NOW, no_silence)
    assert orphan.started and orphan.worker == dead and orphan.silent_for is None


def test_a_pending_run_naming_no_worker_is_an_orphan_only_once_a_submission_would_have_named_one() -> None:
    being_submitted = flow_run(Pending(timestamp=NOW - SUBMISSION_GRACE + timedelta(seconds=1)))
    left_unnamed = flow_run(Pending(timestamp=LONG_AGO))
    assert orphans_of(being_submitted, left_unnamed) == [left_unnamed]


def test_another_hosts_worker_is_dead_once_prefect_counts_it_offline_and_its_running_runs_are_left_alone() -> None:
    elsewhere = f"elsewhere-4242-{PLATFORM}"
    pending = flow_run(Pending(timestamp=LONG_AGO), elsewhere)
    running = flow_run(Running(timestamp=LONG_AGO), elsewhere)
    assert orphans_of(pending, running, online=(elsewhere,)) == []
    assert orphans_of(pending, running) == [pending]


def test_a_running_run_whose_pull_record_went_silent_is_an_orphan_wherever_its_worker_was() -> None:
    elsewhere = f"elsewhere-4242-{PLATFORM}"
    silent, beating = flow_run(Running(timestamp=LONG_AGO), elsewhere), flow_run(Running(timestamp=LONG_AGO))
    assert orphans_of(silent, beating, online=(elsewhere,),
                      pull_silence=lambda run: 200.0 if run is silent else None) == [silent]
    [orphan] = orphaned_runs([silent], PLATFORM, (elsewhere,), NOW, lambda run: 200.0)
    assert orphan.reason("vm-1-mycluster").startswith("its pull's record went 200 s without its heartbeat "
                                                      "(StalePullTimeout): it died (found by worker vm-1-mycluster)")


def test_a_scheduled_run_is_no_orphan() -> None:
    assert orphans_of(flow_run(Scheduled(timestamp=LONG_AGO))) == []


# Through Prefect's client, which tries again a request the session's busy SQLite server answers 503.
def set_state(run_id: str, state: State[Any], labels: dict[str, str] | None = None) -> None:
    """What a worker killed at that point leaves on the run."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)
        if labels:
            client.update_flow_run_labels(UUID(run_id), labels)


def state_history(run_id: str) -> list[tuple[str, str]]:
    """The run's states, oldest first, as the Prefect UI lists them: each its type and message."""
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(UUID(run_id))
    return [(state.type.value, state.message or "") for state in sorted(states, key=lambda state: state.timestamp)]


@pytest.fixture
def runs() -> Iterator[list[str]]:
    """The flow runs the test makes, set CRASHED at its end unless they ended: left PENDING or RUNNING by a failed
    test, each would hold a slot of the session's pool from the tests after it."""
    made: list[str] = []
    yield made
    for run_id in made:
        if state_history(run_id)[-1][0] in ("SCHEDULED", "PENDING", "RUNNING"):
            set_state(run_id, Crashed(message="left by a failed test"))


def test_runs_a_killed_worker_left_are_handed_on_by_the_next_worker_and_their_pulls_complete(
        gateway: GatewayFixture, runs: list[str]) -> None:
    platforms = json.loads(gateway.config_path.read_text())["Platforms"]
    platforms[PLATFORM]["maxConcurrentPulls"] = 2
    gateway.write_config(Platforms=platforms)
    deploy_platforms(gateway.settings)
    launcher = DeploymentLauncher(gateway.settings)
    service = Gateway(gateway.settings, launcher)
    store = gateway.store()
    keys = []
    for name in ("unnamed", "named", "silent"):
        push_image(gateway.registry, f"orphan/{name}", "1", [LayerBuilder().file(name, name.encode())])
        keys.append(PullKey(PLATFORM, "docker", gateway.image(f"orphan/{name}:1")))
        assert service.pull(ROOT, PLATFORM, "docker", keys[-1].tag, AclRequest())["status"] == "PENDING"
        runs.append(str(store.pull_record(keys[-1])["flow_run_id"]))
    unnamed_run, named_run, silent_run = runs
    silent_key = keys.pop()
    # A run the dead worker had started: its process died with it.
    died_running = launcher(PullKey(PLATFORM, "docker", gateway.image("orphan/gone:1")), uuid.uuid4().hex)
    runs.append(died_running)
    # What a worker killed mid-submission leaves: PENDING before it named itself on the run, or after; and RUNNING.
    killed = worker_name(PLATFORM, dead_pid())
    set_state(unnamed_run, Pending())
    set_state(named_run, Pending(), {WORKER_LABEL: killed})
    set_state(died_running, Running(), {WORKER_LABEL: killed})
    # A run another host's worker left RUNNING (Prefect still counts that worker online), its record silent.
    elsewhere = f"elsewhere-4242-{PLATFORM}"
    set_state(silent_run, Running(), {WORKER_LABEL: elsewhere})
    silent_for = gateway.settings.stale_pull_timeout + 10
    pymongo.MongoClient(gateway.mongo_uri)[gateway.database]["pulls"].update_one(
        silent_key.query(), {"$set": {"status": "PULLING", "heartbeat": time.time() - silent_for}})

    with running_workers(gateway, PLATFORM, 1) as workers:
        finder = worker_name(PLATFORM, workers[0].pid)
        # Both pulls complete, nobody asking again (the platform's two slots were held by the dead worker's runs).
        timeout = SUBMISSION_GRACE.total_seconds() + SWEEP_INTERVAL + 90
        for key in keys:
            record_once(lambda key=key: store.pull_record(key) or {},
                        lambda record: record.get("status") in ("READY", "FAILURE"), f"{key.tag} ended", timeout)
            assert service.lookup(ROOT, PLATFORM, "docker", key.tag)["status"] == "READY"
        # READY comes at the index stage; the run completes a moment later, after its report, while its worker lives.
        for run_id in (unnamed_run, named_run):
            record_once(lambda run_id=run_id: {"status": state_history(run_id)[-1][0]},
                        lambda state: state["status"] in ("COMPLETED", "FAILED", "CRASHED"), f"run {run_id} ended", 30)
    for run_id, worker in ((unnamed_run, "the worker that took it"), (named_run, f"its worker {killed}")):
        history = state_history(run_id)
        assert ("SCHEDULED", f"{worker} died before starting it: scheduled again by worker {finder}") in history
        assert history[-1][0] == "COMPLETED", history
    assert state_history(died_running)[-1] == (
        "CRASHED", f"its worker {killed} died, and its run's process with it (found by worker {finder}); the pull's "
                   "record is taken over by the next request once its heartbeat has been silent for StalePullTimeout")
    state, message = state_history(silent_run)[-1]
    assert state == "CRASHED" and message.startswith("its pull's record went "), message
    assert f"s without its heartbeat (StalePullTimeout): it died (found by worker {finder})" in message
    assert silent_for <= float(message.split(" went ")[1].split(" s ")[0]) < silent_for + 120, message
