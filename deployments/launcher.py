"""Starting a pull's flow run on the platform's Prefect deployment."""

from __future__ import annotations

from deployments import deployment_name
from imagegw.store import PullKey


class DeploymentLauncher:
    """Creates a flow run of ``pull-image/<platform>`` and returns at once (the worker runs it)."""

    def __init__(self, config_path: str) -> None:
        self._config_path = config_path

    def __call__(self, key: PullKey) -> str:
        from prefect.deployments import run_deployment

        run = run_deployment(
            deployment_name(key.system),
            parameters={"image": key.tag, "platform": key.system, "config": self._config_path},
            timeout=0,
            tags=[f"platform:{key.system}"],
        )
        return str(run.id)
