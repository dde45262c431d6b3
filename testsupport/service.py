"""What the test services (registry, token server, munged) share: ``with`` stops them; start-up polling."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self


class StoppedOnExit:
    """A started service; leaving a ``with`` block stops it."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_until_answering(answers: Callable[[], bool], process: subprocess.Popen[bytes] | None, timeout: float,
                         interval: float) -> bool:
    """Poll ``answers`` until it is true; False once ``process`` has exited or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(interval)
    return False


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM ``process`` if it still runs, SIGKILL it after ``timeout`` s, and reap it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
