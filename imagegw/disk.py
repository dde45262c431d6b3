"""Writing to the gateway's own disks: one translation of a failed write, durable renames, scratch
space, and writeback started early.

Every stage that writes a file (the layer cache, the squashfs build, publishing) reports a
failing disk the same way: a :class:`StorageError` naming the path and the system's reason.

A layer is fsynced before it gets its name in the cache, and a squashfs before it gets its
name in the image directory. Left to the kernel, their pages stay dirty until then (up to
a tenth of memory, or 30 s), and the fsync writes them all while the pipeline waits. Asked
to start as the file grows, the disk writes beside the work and the fsync finds next to
nothing left (bench/README.md has the figures). Only a hint: where the call is missing or
fails, the fsync does all the work.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from imagegw.background import repeated
from imagegw.errors import StorageError


def storage_error(error: OSError, path: Path | str, doing: str = "") -> StorageError:
    """The gateway's error for a failed write under ``path``: ``<path>: <reason>[ (doing)]``.

    ``path`` is what the caller was writing to, not ``error.filename``: a copy that fails for a
    full target names its source there, which would send an operator to the wrong filesystem.
    """
    reason = error.strerror or str(error)
    return StorageError(f"{os.fsdecode(path)}: {reason}" + (f" ({doing})" if doing else ""))


_NEARLY_FULL = 64 << 20


def full_disk_likely(free_bytes: int | None) -> bool:
    """Whether a write that failed without saying why (tar2sqfs's "I/O error", an SFTP v3 server's
    "Failure") failed for want of space, judged by the bytes still free on its disk (None: unknown).

    Filesystems hold back space they do not count as available, or count allocations late, so a
    write can fail before the count reaches zero; 64 MiB is far more than either writes at once.
    """
    return free_bytes is not None and free_bytes < _NEARLY_FULL


@contextmanager
def disk_errors(path: Path | str, doing: str = "") -> Iterator[None]:
    """Raise a StorageError for any OSError in the block; ``doing`` says what the gateway was at."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, path, doing) from None


def fsync_directory(directory: Path) -> None:
    """Make the renames into ``directory`` durable, so a crash cannot leave a name pointing at nothing."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def scratch_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """A private working directory under ``parent``, removed however the block ends."""
    with disk_errors(parent, "creating a scratch directory"):
        parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
    with scratch as path:
        yield Path(path)


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
