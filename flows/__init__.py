"""The flows: what happens in what order. Importing this package does not import Prefect."""

PULL_FLOW = "pull-image"
"""The name of the pull flow (flows/pull.py), which its deployments are named under."""
EXPIRE_FLOW = "expire-images"
"""The name of the scheduled expire flow (flows/expire.py)."""
REFRESH_FLOW = "refresh-images"
"""The name of the scheduled refresh flow (flows/refresh.py)."""
