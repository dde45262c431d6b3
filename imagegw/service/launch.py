"""Starting a pull: claim its record, hand a registry login to its run, start the run.

The API (a user's pull), the refresh flow and registry notifications all start pulls
this way, so there is never a second run for a tag whose pull is under way. The flow
run is started through a ``PullLauncher`` the caller supplies: this module knows
nothing of Prefect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagegw.access import PUBLIC, Access
from imagegw.errors import ServiceUnavailable
from imagegw.registry.keychain import HandedCredential
from imagegw.store import ImageStore, PullKey

PullLauncher = Callable[[PullKey], str]
"""Starts the flow run of a claimed pull and returns the run's id."""


@dataclass(frozen=True)
class StartedPull:
    """The pull record after a request, and whether this request started its run."""

    record: dict[str, Any]
    started: bool


def start_pull(store: ImageStore, launch: PullLauncher, key: PullKey, *, access: Access = PUBLIC,
               login: HandedCredential | None = None, retry_failures_after: float = 0,
               refresh: bool = False) -> StartedPull:
    """Start a pull of ``key`` unless one is under way (see ``ImageStore.claim_pull``)."""
    record, claimed = store.claim_pull(key, access, retry_failures_after, refresh=refresh)
    if not claimed:
        return StartedPull(record, started=False)
    if login is not None:
        store.store_login(key, login)
    try:
        run_id = launch(key)
    except Exception as exc:  # whatever the launcher's failure, the claim must not stay INIT
        message = f"cannot start a flow run for {key.tag} on {key.system}: {exc}"
        store.fail_pull(key, message)
        raise ServiceUnavailable(message) from None
    return StartedPull(store.mark_queued(key, run_id), started=True)
