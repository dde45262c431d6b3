"""Starting a pull: claim its record, hand a registry login to its run, start the run.

The API (a user's pull), the refresh flow and registry notifications all start pulls
this way, so there is never a second run for a tag whose pull is under way. The flow
run is started through a ``PullLauncher`` the caller supplies: this module knows
nothing of Prefect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from imagegw.access import PUBLIC, Access
from imagegw.errors import ServiceUnavailable
from imagegw.registry.keychain import HandedCredential
from imagegw.store import DeadRun, ImageStore, PullKey

_log = logging.getLogger(__name__)


class PullLauncher(Protocol):
    """Starts pulls' flow runs, and ends the runs of pulls taken over (deployments/launcher.py: Prefect's)."""

    def __call__(self, key: PullKey, pull_id: str) -> str:
        """Start the flow run of the pull claimed as ``pull_id`` (the run writes its record under it); its id."""

    def end_dead_run(self, flow_run_id: str, reason: str) -> None:
        """Mark a run whose pull was taken over as crashed, saying ``reason``: left RUNNING, it would hold one of
        its platform's ``maxConcurrentPulls`` for good. A run that ended meanwhile is left as it ended."""


@dataclass(frozen=True)
class StartedPull:
    """The pull record after a request, and whether this request started its run."""

    record: dict[str, Any]
    started: bool


def start_pull(store: ImageStore, launch: PullLauncher, key: PullKey, *, access: Access = PUBLIC,
               login: HandedCredential | None = None, retry_failures_after: float = 0,
               refresh: bool = False, looked_up_at: float | None = None) -> StartedPull:
    """Start a pull of ``key`` unless one is under way or, if the caller looked the tag up at ``looked_up_at``,
    went READY since (see ``ImageStore.claim``); end the run of one whose heartbeat stopped, which this pull
    takes over."""
    claim = store.claim(key, access, retry_failures_after, refresh=refresh, looked_up_at=looked_up_at)
    if not claim.claimed:
        return StartedPull(claim.record, started=False)
    pull_id = str(claim.record["pull_id"])
    if login is not None:
        store.store_login(key, login)
    try:
        run_id = launch(key, pull_id)
    except Exception as exc:  # whatever the launcher's failure, the claim must not stay INIT
        message = f"cannot start a flow run for {key.tag} on {key.system}: {exc}"
        store.fail_pull(key, pull_id, message)
        raise ServiceUnavailable(message) from None
    queued = store.mark_queued(key, pull_id, run_id)
    if claim.taken_over is not None:
        _end_dead_run(launch, key, claim.taken_over, run_id)
    return StartedPull(queued, started=True)


def _end_dead_run(launch: PullLauncher, key: PullKey, dead: DeadRun, new_run_id: str) -> None:
    """End the run a pull was taken over from. A failure does not fail the request, whose pull is started:
    the operator is told what to do instead."""
    reason = (f"its worker stopped beating the heartbeat of the pull of {key.tag} for {key.system} for "
              f"{dead.silent_for:.0f} s (StalePullTimeout): the pull was taken over by flow run {new_run_id}")
    try:
        launch.end_dead_run(dead.flow_run_id, reason)
    except Exception as exc:
        _log.warning("cannot mark flow run %s crashed (%s): %s; until an operator sets it to Crashed in the "
                     "Prefect UI, it holds one of %s's maxConcurrentPulls", dead.flow_run_id, reason, exc, key.system)
