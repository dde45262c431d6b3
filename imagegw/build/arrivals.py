"""How far each layer of one pull has reached the cache, so that layers can be read while they download.

The layer cache reports a layer's partial file, each write to it, and its final name;
a reader asks for bytes by offset and waits until they are there. Decompression is
deterministic, so when a download is retried the new partial file holds the same bytes
at the same offsets, and a reader carries on from the new file where it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from imagegw.errors import LayerError

_BATCH = 4 * 1024 * 1024


class LayerArrivals:
    """The layers of one image (by blob digest, in layer order) as they arrive in the cache."""

    def __init__(self, digests: Sequence[str]) -> None:
        self.digests = tuple(digests)
        self._changed = threading.Condition()
        self._fds: dict[str, int] = {}
        self._retired: list[int] = []
        """Descriptors replaced by a newer download's: kept open, as a reader may be using one."""
        self._available: dict[str, int] = {}
        self._stored: dict[str, Path] = {}
        self._closed: str | None = None
        self._released = False

    # ------------------------------------------------------------------ what the layer cache reports

    def writing(self, digest: str, partial: Path) -> None:
        """A download of ``digest`` began writing its decompressed tar to ``partial``."""
        self._check_wanted(digest)
        fd = os.open(partial, os.O_RDONLY)
        with self._changed:
            self._replace_fd(digest, fd)
            self._available[digest] = 0
            self._changed.notify_all()

    def written(self, digest: str, size: int) -> None:
        """The partial file of ``digest`` now holds ``size`` bytes."""
        self._check_wanted(digest)
        with self._changed:
            self._available[digest] = size
            self._changed.notify_all()

    def stored(self, digest: str, path: Path) -> None:
        """``digest`` is in the cache, verified, at ``path``."""
        # Opened anew even after a partial file of ours: that may be a failed attempt's, and
        # another process may have stored the layer since.
        self._check_wanted(digest)
        fd = os.open(path, os.O_RDONLY)
        with self._changed:
            self._replace_fd(digest, fd)
            self._available[digest] = os.fstat(fd).st_size
            self._stored[digest] = path
            self._changed.notify_all()

    def close(self, why: str) -> None:
        """No more arrivals (the pull stage ended): readers of missing layers stop, told ``why``."""
        with self._changed:
            self._closed = why
            self._changed.notify_all()

    def release(self) -> None:
        """The build is over: close the files held open for readers, and stop the downloads still
        writing its layers at their next write (that raises LayerError), as no one will read them.

        Only a cancelled build is left with downloads running: it is not held up until they end
        (a layer can take minutes), and they do not go on filling the cache after it.
        """
        with self._changed:
            self._released = True
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()

    # ------------------------------------------------------------------ what readers ask

    def all_stored(self) -> bool:
        """Whether every layer is in the cache."""
        with self._changed:
            return all(digest in self._stored for digest in self.digests)

    def wait_stored(self, index: int) -> Path:
        """The cached tar of layer ``index``, once it is complete and verified."""
        digest = self.digests[index]
        with self._changed:
            self._changed.wait_for(lambda: digest in self._stored or self._closed is not None)
            self._check_open(digest)
            return self._stored[digest]

    def read(self, index: int, offset: int, size: int, ahead: int = 0) -> bytes:
        """``size`` bytes of layer ``index`` from ``offset``, waiting for them (fewer only at the tar's
        end), and up to ``ahead`` bytes more of what is there already."""
        fd, available = self._wait_for(index, offset + size)
        return os.pread(fd, max(size, min(size + ahead, available - offset)), offset)

    def readable(self, index: int, offset: int, end: int) -> tuple[int, int]:
        """A descriptor of layer ``index`` and how far (beyond ``offset``, up to ``end``) it can be read now.

        Waits until a batch of bytes beyond ``offset`` is there (all up to ``end`` if that is
        nearer), unless the layer ends first: moving data in large pieces spares both sides
        of the pipe wake-ups.
        """
        fd, available = self._wait_for(index, min(end, offset + _BATCH))
        return fd, min(end, available)

    def _wait_for(self, index: int, end: int) -> tuple[int, int]:
        digest = self.digests[index]

        def ready() -> bool:
            return self._available.get(digest, 0) >= end or digest in self._stored or self._closed is not None
        with self._changed:
            self._changed.wait_for(ready)
            self._check_open(digest)
            return self._fds[digest], self._available[digest]

    def _check_wanted(self, digest: str) -> None:
        if self._released:  # read without the lock: a write more or less before the stop does not matter
            raise LayerError(f"layer {digest}: download abandoned, as the build that wanted it is over")

    def _check_open(self, digest: str) -> None:
        if digest not in self._stored and self._closed is not None:
            raise LayerError(f"layer {digest} did not arrive: {self._closed}")

    def _replace_fd(self, digest: str, fd: int) -> None:
        old = self._fds.get(digest)
        self._fds[digest] = fd
        if old is not None:
            self._retired.append(old)
