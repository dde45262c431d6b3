"""Starting a file's writeback to disk early, so that the fsync which publishes it is short.

A layer is fsynced before it gets its name in the cache, and a squashfs before it gets its
name in the image directory. Left to the kernel, their pages stay dirty until then (up to
a tenth of memory, or 30 s), and the fsync writes them all while the pipeline waits: 0.27 s
for an 875 MB layer, 0.2 s for a 360 MB squashfs. Asked to start as the file grows, the disk
writes beside the work and the fsync finds next to nothing left. Only a hint: where the call
is missing or fails, the fsync does all the work.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from imagegw.background import repeated

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Have the kernel start writing ``length`` bytes of ``fd`` from ``offset`` (0: to the end), without waiting."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def written_back_as_it_grows(path: Path, interval: float = 0.5) -> AbstractContextManager[None]:
    """While the block runs, start the writeback of ``path`` (which another process writes) every ``interval`` s."""

    def write_back() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # not created yet
        try:
            start_writeback(fd)
        finally:
            os.close(fd)

    return repeated(write_back, interval, f"writeback {path.name}")
