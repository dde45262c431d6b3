"""The flows: what happens in what order. Importing this package does not import Prefect."""

import importlib

PULL_FLOW = "pull-image"
"""The name of the pull flow (flows/pull.py), which its deployments are named under."""
EXPIRE_FLOW = "expire-images"
"""The name of the scheduled expire flow (flows/expire.py)."""
REFRESH_FLOW = "refresh-images"
"""The name of the scheduled refresh flow (flows/refresh.py)."""

RUN_TIME_IMPORTS = ("prefect.flow_engine", "prefect.task_engine", "prefect.utilities.visualization",
                    "anyio._backends._asyncio", "fastapi.encoders")
"""What Prefect imports only once a flow runs: its engines, anyio's event loop backend, flow visualization (with
graphviz) and the encoder of a run's parameters. A process about to run a flow imports them while it waits for
something else (0.15 s in a run forked from the warm worker, 0.3 s in ``imagegw pull``)."""


def import_run_time_modules() -> None:
    """Import :data:`RUN_TIME_IMPORTS` now, not in the middle of the first flow run."""
    for name in RUN_TIME_IMPORTS:
        importlib.import_module(name)
