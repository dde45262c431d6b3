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
import fcntl
import os
import shutil
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


SCRATCH_LOCK = ".owner.lock"
"""In each scratch directory: its owner holds an exclusive flock on this file for the directory's whole life.
The kernel drops a flock when its process dies, however it dies (SIGKILL, the OOM killer), so whoever can
take the lock knows the owner is dead: no age or heartbeat to guess from, and a slow live pull is never
mistaken for a dead one (on this host: flocks do not reach other hosts of a shared ExpandDirectory)."""


@contextmanager
def scratch_directory(parent: Path, prefix: str) -> Iterator[Path]:
    """A private working directory under ``parent``, owned (``SCRATCH_LOCK``) and removed however the block ends."""
    with disk_errors(parent, "creating a scratch directory"):
        parent.mkdir(parents=True, exist_ok=True)
        path, lock = _owned_directory(parent, prefix)
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path)
        finally:
            os.close(lock)  # only once the directory is gone: no sweeper may take it for a dead pull's


def _owned_directory(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new directory under ``parent`` and the descriptor of its lock, held."""
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        lock = os.open(path / SCRATCH_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _still_named(lock, path / SCRATCH_LOCK):
            return path, lock
        # A sweeper took the lock between its creation and ours, and removed the directory: make another.
        os.close(lock)


def remove_abandoned_scratch(scratch: Path) -> int | None:
    """Remove a scratch directory whose owner died, as its free ``SCRATCH_LOCK`` shows: the bytes freed. None
    when the owner lives, or when there is no lock to tell (an owner that died before taking it)."""
    try:
        lock = os.open(scratch / SCRATCH_LOCK, os.O_RDWR)  # never created here: it is the owner's to make
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not _still_named(lock, scratch / SCRATCH_LOCK):
            return None  # its owner finished meanwhile and removed it
        size = bytes_under(scratch)
        shutil.rmtree(scratch)
        return size
    finally:
        os.close(lock)


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a directory removed meanwhile takes the name along)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def bytes_under(directory: Path) -> int:
    """The bytes of the files under ``directory``."""
    return sum((Path(parent) / name).lstat().st_size for parent, _, files in os.walk(directory) for name in files)


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
