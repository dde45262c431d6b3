"""How the pull flow is deployed: one work pool and one deployment per platform.

The names are here, apart from deployments/platforms.py, so that processes which only name a
deployment (the supervisor, the API's launcher) need not import Prefect.
"""

from flows import PULL_FLOW


def deployment_name(platform: str) -> str:
    """The deployment that runs ``platform``'s pulls: ``pull-image/<platform>``."""
    return f"{PULL_FLOW}/{platform}"


def work_pool_name(platform: str) -> str:
    """The work pool whose workers run ``platform``'s pulls."""
    return f"imagegw-{platform}"
