"""Runs a dead worker left behind in its platform's pool, found and handed on by the pool's live workers.

A worker killed outright (SIGKILL, the OOM killer, a crashed host) tells Prefect nothing, and Prefect's server
ends none of its runs. Each such run holds one of the platform's ``maxConcurrentPulls`` slots:

- **PENDING**: taken, but never started (the worker died while submitting it). Its pull's record waits as queued,
  which a request takes over only after an hour (``STALE_QUEUED``). Such a run is **scheduled again**: any live
  worker of the pool starts it, and the pull completes with nobody asking again.
- **RUNNING**: its process died with the worker (``deployments.warmworker``). It is set **CRASHED**, so its slot is
  free even if nobody asks for its tag again, once it is surely dead: its worker was of this host and its process is
  gone, or its pull's record has gone ``StalePullTimeout`` without its heartbeat (the rule by which a request takes
  a pull over; a worker Prefect counts offline may only have lost the server, its runs alive). Its pull's record is
  taken over by the next request, as for any pull whose heartbeat stopped. It is not run again here: that request
  brings the user's registry login again, which the dead run had taken (a login handed to a pull is read once).

Whether a worker lives: one of this host by its process; one of another host by Prefect's count of it as online
(it misses three heartbeats, 90 s, before it is counted offline). A PENDING run that names no worker
``SUBMISSION_GRACE`` after it became PENDING was being submitted when its worker died: a worker names a run just after
making it PENDING (``_give_worker_labels_to_flow_run`` in Prefect's worker).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from uuid import UUID

import anyio
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
from imagegw.errors import ImagegwError
from imagegw.plan import pull_key
from imagegw.processes import alive
from imagegw.store import ImageStore

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
    silent_for: float | None = None
    """Seconds its pull's record had gone without its heartbeat, if that is how it was found dead."""

    def reason(self, finder: str) -> str:
        """What the run's new state says, for an operator reading it in the Prefect UI."""
        whose = f"its worker {self.worker}" if self.worker else "the worker that took it"
        if not self.started:
            return f"{whose} died before starting it: scheduled again by worker {finder}"
        how = (f"its pull's record went {self.silent_for:.0f} s without its heartbeat (StalePullTimeout): it died"
               if self.silent_for is not None else f"{whose} died, and its run's process with it")
        return (f"{how} (found by worker {finder}); the pull's record is taken over by the next request once its "
                "heartbeat has been silent for StalePullTimeout")


PullSilence = Callable[["FlowRun"], "float | None"]
"""Seconds a RUNNING run's pull record has gone past StalePullTimeout without its heartbeat; None while it lives."""


def orphaned_runs(runs: Iterable[FlowRun], platform: str, online_workers: Collection[str], now: datetime,
                  pull_silence: PullSilence) -> list[OrphanedRun]:
    """Those of the pool's PENDING and RUNNING ``runs`` whose worker is dead (see the module's note)."""
    found = []
    for run in runs:
        if run.state is None:
            continue
        worker = run.labels.get(WORKER_LABEL)
        name = str(worker) if worker else None
        pid = worker_pid_on_this_host(name, platform) if name else None
        if run.state.type is StateType.RUNNING:
            worker_gone = pid is not None and not alive(pid)
            silent_for = None if worker_gone else pull_silence(run)
            if worker_gone or silent_for is not None:
                found.append(OrphanedRun(run.id, run.name, name, started=True, silent_for=silent_for))
        elif run.state.type is StateType.PENDING and now - run.state.timestamp > SUBMISSION_GRACE:
            if name is None or (not alive(pid) if pid is not None else name not in online_workers):
                found.append(OrphanedRun(run.id, run.name, name, started=False))
    return found


def pull_silence_in(store: ImageStore) -> PullSilence:
    """How long a pull run's record has been silent (``ImageStore.silence_of_dead_pull``), from the parameters its
    launcher gave it; None for a run of another flow, or a pull started from the UI (its claim is not named)."""

    def silence(run: FlowRun) -> float | None:
        image, platform, pull_id = (run.parameters.get(name) for name in ("image", "platform", "pull_id"))
        if not (isinstance(image, str) and isinstance(platform, str) and isinstance(pull_id, str)):
            return None
        try:
            key = pull_key(platform, image)
        except ImagegwError:  # a run started from the UI with a name no pull could have
            return None
        return store.silence_of_dead_pull(key, pull_id)

    return silence


async def hand_on_orphaned_runs(client: PrefectClient, platform: str, finder: str, pull_silence: PullSilence,
                                ) -> list[OrphanedRun]:
    """Schedule again the pool's runs a dead worker took and never started, and crash those it left running (see the
    module's note); the runs handed on. ``finder``: the worker doing it, named in the runs' states."""
    pool = work_pool_name(platform)
    runs = await client.read_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))))
    if not runs:
        return []
    online = {worker.name for worker in await client.read_workers_for_work_pool(pool)
              if worker.status is WorkerStatus.ONLINE}
    # In a thread: the pull records are read from the database, which this worker's event loop must not wait for.
    orphans = await anyio.to_thread.run_sync(orphaned_runs, runs, platform, online, datetime.now(timezone.utc),
                                             pull_silence)
    for orphan in orphans:
        # Not forced: Prefect's rules keep a run that moved on meanwhile (ended, or started after all) as it is.
        new_state = Crashed if orphan.started else Scheduled
        await client.set_flow_run_state(orphan.run_id, new_state(message=orphan.reason(finder)))
    return orphans
