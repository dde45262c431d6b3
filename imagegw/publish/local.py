"""Publishing an image into a platform's image directory, atomically.

The runtime opens ``<imageDir>/<id>.squashfs`` and ``<id>.meta`` by name, so a
reader must never see a partial file under either name: each is written under
a hidden temporary name in the same directory, flushed to disk, and renamed.
The squashfs goes first, so a ``.meta`` always has its image beside it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from imagegw.disk import disk_errors, fsync_directory
from imagegw.publish.publisher import IMAGE_FILE_MODE, PublishedImage


class LocalPublisher:
    """Publishes images into an image directory on this host (``accesstype: local``)."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir

    def __str__(self) -> str:
        return str(self.image_dir)

    def __enter__(self) -> LocalPublisher:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Nothing is held open between calls."""

    def paths(self, image_id: str) -> tuple[Path, Path]:
        """Where an image's squashfs and ``.meta`` live."""
        return self.image_dir / f"{image_id}.squashfs", self.image_dir / f"{image_id}.meta"

    def is_published(self, image_id: str) -> bool:
        """Whether both of an image's files are in place."""
        return all(path.is_file() for path in self.paths(image_id))

    def publish(self, squashfs: Path | None, meta_text: str, image_id: str) -> PublishedImage:
        """Move a built squashfs and write its ``.meta`` into the image directory under their final names.

        Without a squashfs, only the ``.meta`` is rewritten (an image already in place whose
        access changed).
        """
        target, meta_target = self.paths(image_id)
        with disk_errors(self.image_dir, f"publishing image {image_id}"):
            self.image_dir.mkdir(parents=True, exist_ok=True)
            if squashfs is not None:
                _place_file(squashfs, target)
            _write_file(meta_text.encode(), meta_target)
            fsync_directory(self.image_dir)
            size = target.stat().st_size
        return PublishedImage(squashfs=target, meta=meta_target, size=size)

    def free_bytes(self) -> int | None:
        """Bytes free now in the filesystem the image directory is on (or will be: it is made on publishing)."""
        directory = self.image_dir
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
        try:
            stats = os.statvfs(directory)
        except OSError:
            return None
        return stats.f_bavail * stats.f_frsize

    def unpublish(self, image_id: str) -> None:
        """Remove an image's files (the ``.meta`` first, so no reader finds a meta without its image)."""
        squashfs, meta = self.paths(image_id)
        with disk_errors(self.image_dir, f"removing image {image_id}"):
            meta.unlink(missing_ok=True)
            squashfs.unlink(missing_ok=True)


def _place_file(source: Path, target: Path) -> None:
    temporary = _temporary_name(target)
    try:
        try:
            os.link(source, temporary)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(source, temporary)
        _finish(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _write_file(content: bytes, target: Path) -> None:
    temporary = _temporary_name(target)
    try:
        temporary.write_bytes(content)
        _finish(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _finish(temporary: Path, target: Path) -> None:
    os.chmod(temporary, IMAGE_FILE_MODE)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def _temporary_name(target: Path) -> Path:
    # mkstemp reserves a unique name; we only need the name, the file is recreated.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    os.unlink(name)
    return Path(name)
