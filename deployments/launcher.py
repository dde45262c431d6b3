"""Starting a pull's flow run on the platform's Prefect deployment, and ending the run of a pull taken over."""

from __future__ import annotations

from deployments import deployment_name, doorbell
from imagegw.config import Settings
from imagegw.store import PullKey


class DeploymentLauncher:
    """Creates a flow run of ``pull-image/<platform>``, rings the doorbells of the platform's workers on this host
    (``deployments.doorbell``), and returns at once (a worker runs it)."""

    def __init__(self, settings: Settings) -> None:
        # Prefect imported now, as the API process starts, not by its first pull, which waited seconds for it. Not
        # at this module's import: Prefect reads its settings (PREFECT_API_URL) as it is imported.
        from prefect.deployments import run_deployment

        from deployments.tlscontexts import share_tls_contexts

        share_tls_contexts()

        self._config_path = str(settings.source)
        self._state_dir = settings.state_dir
        self._run_deployment = run_deployment

    def __call__(self, key: PullKey, pull_id: str) -> str:
        run = self._run_deployment(
            deployment_name(key.system),
            parameters={"image": key.tag, "platform": key.system, "config": self._config_path, "pull_id": pull_id},
            timeout=0,
            tags=[f"platform:{key.system}"],
        )
        doorbell.ring(self._state_dir, key.system)
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
