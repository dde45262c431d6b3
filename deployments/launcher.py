"""Starting a pull's flow run on the platform's Prefect deployment, and ending the run of a pull taken over."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from deployments import deployment_name, doorbell
from imagegw.config import Settings
from imagegw.store import PullKey

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient


class DeploymentLauncher:
    """Creates a flow run of ``pull-image/<platform>``, rings the doorbells of the platform's workers on this host
    (``deployments.doorbell``), and returns at once (a worker runs it)."""

    def __init__(self, settings: Settings) -> None:
        # Prefect's client imported now (by prefectclients), as the API process starts, not by its first pull, which
        # waited seconds for it. Not at this module's import: Prefect reads its settings (PREFECT_API_URL) as it is
        # imported.
        from deployments.prefectclients import tune_prefect_clients

        tune_prefect_clients()

        self._config_path = str(settings.source)
        self._state_dir = settings.state_dir
        self._deployment_ids: dict[str, UUID] = {}
        """Each platform's deployment, read by name at its first pull: one request fewer in every pull after."""

    def __call__(self, key: PullKey, pull_id: str) -> str:
        run_id = self._create_run(key, pull_id)
        doorbell.ring(self._state_dir, key.system)
        return run_id

    def _create_run(self, key: PullKey, pull_id: str) -> str:
        """The run of ``pull_id``, created once however many tries its request takes (a 503 is tried again,
        ``deployments.prefectclients``): the pull's id is the run's idempotency key, for which Prefect's server
        returns the run it made, if it made one."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import PrefectHTTPStatusError

        with get_client(sync_client=True) as client:
            known = self._deployment_ids.get(key.system)
            if known is not None:
                try:
                    return self._create_run_of(client, known, key, pull_id)
                except PrefectHTTPStatusError as exc:
                    if exc.response.status_code != 404:
                        raise
                    # The deployment was removed since it was read, and may have been made again (`imagegw deploy`).
            return self._create_run_of(client, self._read_deployment_id(client, key.system), key, pull_id)

    def _read_deployment_id(self, client: SyncPrefectClient, platform: str) -> UUID:
        deployment_id = client.read_deployment_by_name(deployment_name(platform)).id
        self._deployment_ids[platform] = deployment_id
        return deployment_id

    def _create_run_of(self, client: SyncPrefectClient, deployment_id: UUID, key: PullKey, pull_id: str) -> str:
        run = client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"image": key.tag, "platform": key.system, "config": self._config_path, "pull_id": pull_id},
            tags=[f"platform:{key.system}"],
            idempotency_key=pull_id,
        )
        return str(run.id)

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
