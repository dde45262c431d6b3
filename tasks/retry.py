"""When a failed stage is worth running again."""

from __future__ import annotations

from typing import Any

import httpx

from imagegw.errors import TRANSIENT_ERRORS


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network and transfer hiccups; a bad manifest or a hostile layer fails at once."""
    return isinstance(state.data, TRANSIENT_ERRORS)


def prefect_api_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a stage that writes to the Prefect API while the API cannot be reached (a server restarting)."""
    return isinstance(state.data, httpx.TransportError)
