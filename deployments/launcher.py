"""Starting a pull's flow run on the platform's Prefect deployment, and ending the run of a pull taken over."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from deployments import deployment_name, doorbell
from imagegw.config import Settings
from imagegw.store import PullKey

if TYPE_CHECKING:
    import httpx

LOCKED_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
"""Seconds between tries to create a pull's run while Prefect's server answers 503. On SQLite it does so when
another writer took the database between the request's read of the deployment and its insert of the run (the
previous run's last records, often): the insert was rolled back, and succeeds a moment later. Prefect's client
would wait 2 s, then 4, 8...; that wait was in 4 of 8 pulls made one after another."""
SERVER_BUSY = 503


class DeploymentLauncher:
    """Creates a flow run of ``pull-image/<platform>``, rings the doorbells of the platform's workers on this host
    (``deployments.doorbell``), and returns at once (a worker runs it)."""

    def __init__(self, settings: Settings) -> None:
        # Prefect's client imported now (by tlscontexts), as the API process starts, not by its first pull, which
        # waited seconds for it. Not at this module's import: Prefect reads its settings (PREFECT_API_URL) as it is
        # imported.
        from deployments.tlscontexts import share_tls_contexts

        share_tls_contexts()

        self._config_path = str(settings.source)
        self._state_dir = settings.state_dir
        self._without_retries: tuple[Any, Any] = (None, None)
        """(Prefect's settings, a copy of them without the client's retries): the copy takes 80 ms to make."""

    def __call__(self, key: PullKey, pull_id: str) -> str:
        run_id = self._create_run(key, pull_id)
        doorbell.ring(self._state_dir, key.system)
        return run_id

    def _create_run(self, key: PullKey, pull_id: str) -> str:
        """The run of ``pull_id``, created once however many tries it takes: the pull's id is the run's
        idempotency key, for which Prefect's server returns the run it made, if it made one."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import PrefectHTTPStatusError

        delays = iter(LOCKED_RETRY_DELAYS)
        hooks = {"response": [_retry_after_busy_at_once]}
        with self._tries_made_here(), get_client(sync_client=True, httpx_settings={"event_hooks": hooks}) as client:
            while True:
                try:
                    deployment = client.read_deployment_by_name(deployment_name(key.system))
                    run = client.create_flow_run_from_deployment(
                        deployment.id,
                        parameters={"image": key.tag, "platform": key.system, "config": self._config_path,
                                    "pull_id": pull_id},
                        tags=[f"platform:{key.system}"],
                        idempotency_key=pull_id,
                    )
                    return str(run.id)
                except PrefectHTTPStatusError as exc:
                    delay = next(delays, None)
                    if exc.response.status_code != SERVER_BUSY or delay is None:
                        raise
                    time.sleep(delay)

    def _tries_made_here(self) -> Any:
        """A context of the current Prefect settings without the client's own retries: the tries are made here."""
        from prefect.context import SettingsContext, get_settings_context
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings

        current = get_current_settings()
        seen, copy = self._without_retries
        if seen is not current:
            copy = current.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
            self._without_retries = (current, copy)
        return SettingsContext(profile=get_settings_context().profile, settings=copy)

    def end_dead_run(self, flow_run_id: str, reason: str) -> None:
        """Set the run CRASHED: its work pool counts only PENDING and RUNNING runs against the platform's
        ``maxConcurrentPulls``, so its slot is free at once (and a deployment concurrency limit's lease is
        released by Prefect's rules on leaving RUNNING)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            # Not forced: Prefect's rules then refuse to turn a run that ended meanwhile (FAILED, say, its
            # last state reaching the server late) into a crash, and keep what it really did.
            client.set_flow_run_state(flow_run_id, Crashed(message=reason))


def _retry_after_busy_at_once(response: httpx.Response) -> None:
    """Told to make no retry, Prefect's client still sleeps 2 s after a 503 before it returns it, unless the answer
    names a Retry-After: name none to wait, as the launcher makes its own tries."""
    if response.status_code == SERVER_BUSY:
        response.headers["Retry-After"] = "0"
