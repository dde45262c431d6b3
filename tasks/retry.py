"""When a failed stage is worth running again."""

from __future__ import annotations

from typing import Any

from imagegw.errors import TRANSIENT_ERRORS


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network and transfer hiccups; a bad manifest or a hostile layer fails at once."""
    return isinstance(state.data, TRANSIENT_ERRORS)
