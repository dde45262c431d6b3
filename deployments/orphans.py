"""Runs a dead worker left behind in its platform's pool, found and handed on by the pool's live workers.

A worker killed outright (SIGKILL, the OOM killer, a crashed host) tells Prefect nothing, and Prefect's server
ends none of its runs. Each such run holds one of the platform's ``maxConcurrentPulls`` slots:

- **PENDING**: taken, but never started (the worker died while submitting it). Its pull's record waits as queued,
  which a request takes over only after an hour (``STALE_QUEUED``). Such a run is **scheduled again**: any live
  worker of the pool starts it, and the pull completes with nobody asking again.
- **RUNNING** on this host: its process died with the worker (``deployments.warmworker``). It is set **CRASHED**:
  its slot is free at once, and its pull's record, silent, is taken over by the next request after
  ``StalePullTimeout``, as for any pull whose heartbeat stopped. It is not run again here: that request brings
  the user's registry login again, which the dead run had taken (a login handed to a pull is read once). A RUNNING
  run of another host's worker is left to that rule alone: a worker Prefect counts offline may only have lost the
  server, its runs alive.

Whether a worker lives: one of this host by its process; one of another host by Prefect's count of it as online
(it misses three heartbeats, 90 s, before it is counted offline). A PENDING run that names no worker
``SUBMISSION_GRACE`` after it became PENDING was being submitted when its worker died: a worker names a run just after
making it PENDING (``_give_worker_labels_to_flow_run`` in Prefect's worker).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType, WorkerStatus
from prefect.states import Crashed, Scheduled

from deployments import work_pool_name, worker_pid_on_this_host
from imagegw.processes import alive

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun

SUBMISSION_GRACE = timedelta(seconds=30)
"""How long a run may stay PENDING before the worker it names (or its lack of one) is looked at: a live worker
names its run and starts its process within a second, or a few on a busy server."""
SWEEP_INTERVAL = 30.0
"""Seconds between a worker's looks for its pool's orphaned runs, after the first as it starts."""
WORKER_LABEL = "prefect.worker.name"
"""The label Prefect's worker writes on each run it takes: its name."""


@dataclass(frozen=True)
class OrphanedRun:
    """A run of the pool whose worker is dead."""

    run_id: UUID
    run_name: str
    worker: str | None
    """The worker named on the run, if it got that far."""
    started: bool
    """RUNNING (its process died with the worker) rather than PENDING (never started)."""

    def reason(self, finder: str) -> str:
        """What the run's new state says, for an operator reading it in the Prefect UI."""
        whose = f"its worker {self.worker}" if self.worker else "the worker that took it"
        if self.started:
            return (f"{whose} died, and its run's process with it (found by worker {finder}); the pull's record is "
                    "taken over by the next request once its heartbeat has been silent for StalePullTimeout")
        return f"{whose} died before starting it: scheduled again by worker {finder}"


def orphaned_runs(runs: Iterable[FlowRun], platform: str, online_workers: Collection[str], now: datetime,
                  ) -> list[OrphanedRun]:
    """Those of the pool's PENDING and RUNNING ``runs`` whose worker is dead (see the module's note)."""
    found = []
    for run in runs:
        if run.state is None:
            continue
        worker = run.labels.get(WORKER_LABEL)
        name = str(worker) if worker else None
        pid = worker_pid_on_this_host(name, platform) if name else None
        if run.state.type is StateType.RUNNING:
            orphaned = pid is not None and not alive(pid)
        elif run.state.type is StateType.PENDING and now - run.state.timestamp > SUBMISSION_GRACE:
            orphaned = name is None or (not alive(pid) if pid is not None else name not in online_workers)
        else:
            orphaned = False
        if orphaned:
            found.append(OrphanedRun(run.id, run.name, name, started=run.state.type is StateType.RUNNING))
    return found


async def hand_on_orphaned_runs(client: PrefectClient, platform: str, finder: str) -> list[OrphanedRun]:
    """Schedule again the pool's runs a dead worker took and never started, and crash those it left running on this
    host (see the module's note); the runs handed on. ``finder``: the worker doing it, named in the runs' states."""
    pool = work_pool_name(platform)
    runs = await client.read_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))))
    if not runs:
        return []
    online = {worker.name for worker in await client.read_workers_for_work_pool(pool)
              if worker.status is WorkerStatus.ONLINE}
    orphans = orphaned_runs(runs, platform, online, datetime.now(timezone.utc))
    for orphan in orphans:
        # Not forced: Prefect's rules keep a run that moved on meanwhile (ended, or started after all) as it is.
        new_state = Crashed if orphan.started else Scheduled
        await client.set_flow_run_state(orphan.run_id, new_state(message=orphan.reason(finder)))
    return orphans
