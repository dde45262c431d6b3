"""Importing a squashfs file a user already has on the gateway host (Shifter's ``doimport``).

The gateway may run with more rights than the user, so it reads only files the
user could read themselves, refuses anything that is not a squashfs, and works
on its own copy: the user's file is never linked into the image directory,
where later changes to it would change a published image.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imagegw.errors import BadRequest, Forbidden

SQUASHFS_MAGIC = b"hsqs"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportedFile:
    """The gateway's copy of an imported squashfs."""

    path: Path
    image_id: str
    """sha256 of the file's bytes, hex."""
    size: int


def copy_importable(source: str, uid: int, gids: frozenset[int], scratch: Path) -> ImportedFile:
    """Copy a user's squashfs into ``scratch`` (hashing it on the way), if that user may read it."""
    path = Path(source)
    if not path.is_absolute():
        raise BadRequest(f"filepath must be absolute, not {source!r}")
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BadRequest(f"cannot open {source}: {exc.strerror}") from None
    with os.fdopen(handle, "rb") as reader:
        info = os.fstat(reader.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest(f"{source} is not a regular file")
        if not _readable_by(info, uid, gids):
            raise Forbidden(f"uid {uid} may not read {source}")
        if reader.read(len(SQUASHFS_MAGIC)) != SQUASHFS_MAGIC:
            raise BadRequest(f"{source} is not a squashfs image")
        reader.seek(0)
        return _copy(reader, scratch / "import.squashfs")


def _readable_by(info: os.stat_result, uid: int, gids: frozenset[int]) -> bool:
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid in gids:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def _copy(reader: BinaryIO, target: Path) -> ImportedFile:
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    return ImportedFile(path=target, image_id=digest.hexdigest(), size=size)
