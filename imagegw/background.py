"""Doing something every few seconds in the background while a block of code runs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def repeated(action: Callable[[], None], interval: float, name: str) -> Iterator[None]:
    """Call ``action`` every ``interval`` seconds in a thread called ``name`` until the block ends.

    ``action`` handles its own failures: one that raises ends the repetition.
    """
    stop = threading.Event()

    def repeat() -> None:
        while not stop.wait(interval):
            action()

    thread = threading.Thread(target=repeat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
