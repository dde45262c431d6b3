"""Background repetition: the pull heartbeat and the squashfs writeback ride on it."""

from __future__ import annotations

import threading
import time

from imagegw.background import repeated


def test_the_action_repeats_while_the_block_runs_and_not_after() -> None:
    calls: list[float] = []

    with repeated(lambda: calls.append(time.monotonic()), 0.02, "test"):
        time.sleep(0.25)
    made = len(calls)
    time.sleep(0.1)

    assert made >= 3
    assert len(calls) == made
    assert not any(thread.name == "test" for thread in threading.enumerate())

