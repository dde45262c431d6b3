"""How the pull flow is deployed: one work pool and one deployment per platform.

The names are here, apart from deployments/platforms.py, so that processes which only name a
deployment (the supervisor, the API's launcher) need not import Prefect.
"""

import socket

from flows import PULL_FLOW


def deployment_name(platform: str, flow: str = PULL_FLOW) -> str:
    """The deployment of ``flow`` (the pull flow by default) for ``platform``: ``pull-image/<platform>``."""
    return f"{flow}/{platform}"


def work_pool_name(platform: str) -> str:
    """The work pool whose workers run ``platform``'s pulls."""
    return f"imagegw-{platform}"


def worker_name(platform: str, pid: int) -> str:
    """The name of the worker of ``platform`` in process ``pid`` on this host: two workers of one pool on one host
    are two workers. Prefect labels each run with its worker's name."""
    return f"{socket.gethostname()}-{pid}-{platform}"


def worker_pid_on_this_host(name: str, platform: str) -> int | None:
    """The process of the worker of ``platform`` named ``name``, if ``worker_name`` named it on this host."""
    pid = name.removeprefix(f"{socket.gethostname()}-").removesuffix(f"-{platform}")
    return int(pid) if pid.isdigit() and name == worker_name(platform, int(pid)) else None
