"""How the pull flow is deployed: one work pool and one deployment per platform.

The names are here, apart from deployments/platforms.py, so that processes which only name a
deployment (the supervisor, the API's launcher) need not import Prefect.
"""

from flows import PULL_FLOW


def deployment_name(platform: str, flow: str = PULL_FLOW) -> str:
    """The deployment of ``flow`` (the pull flow by default) for ``platform``: ``pull-image/<platform>``."""
    return f"{flow}/{platform}"


def work_pool_name(platform: str) -> str:
    """The work pool whose workers run ``platform``'s pulls."""
    return f"imagegw-{platform}"
