"""Turning byte counts from parallel layer downloads into a throttled progress message."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from imagegw.registry.client import LayerDescriptor


class DownloadProgress:
    """Collects ``(digest, new_bytes)`` reports and passes a summary to ``report`` at most every ``interval`` s."""

    def __init__(self, layers: Sequence[LayerDescriptor], report: Callable[[str], None],
                 interval: float = 1.0) -> None:
        self._sizes = {layer.digest: layer.size for layer in layers}
        self._received: dict[str, int] = {}
        self._report = report
        self._interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, digest: str, new_bytes: int) -> None:
        with self._lock:
            self._received[digest] = self._received.get(digest, 0) + new_bytes
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            message = self.summary()
        self._report(message)

    @property
    def received(self) -> int:
        """Compressed bytes downloaded so far, over all layers."""
        with self._lock:
            return sum(self._received.values())

    def summary(self) -> str:
        total = sum(self._sizes.values())
        received = sum(self._received.values())
        done = sum(1 for digest, size in self._sizes.items() if self._received.get(digest, 0) >= size)
        return (f"Pulling layers: {done}/{len(self._sizes)} done, "
                f"{received / 1e6:.1f} of {total / 1e6:.1f} MB")
