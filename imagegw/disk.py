"""Writing to the gateway's own disks: one translation of a failed write, durable renames, scratch space.

Every stage that writes a file (the layer cache, the squashfs build, publishing) reports a
failing disk the same way: a :class:`StorageError` naming the path and the system's reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagegw.errors import StorageError


def storage_error(error: OSError, path: Path | str, doing: str = "") -> StorageError:
    """The gateway's error for a failed write under ``path``: ``<path>: <reason>[ (doing)]``.

    ``path`` is what the caller was writing to, not ``error.filename``: a copy that fails for a
    full target names its source there, which would send an operator to the wrong filesystem.
    """
    reason = error.strerror or str(error)
    return StorageError(f"{os.fsdecode(path)}: {reason}" + (f" ({doing})" if doing else ""))


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
