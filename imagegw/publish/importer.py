"""Importing a squashfs file a user already has on the gateway host (Shifter's ``doimport``).

The gateway may run with more rights than the user, so it opens the file as the
user (:func:`imagegw.publish.asuser.open_as`): the kernel applies the parent
directories' search permission, ACLs and groups as it would to the user's own
processes. It refuses anything that is not a squashfs, and works on its own
copy: the user's file is never linked into the image directory, where later
changes to it would change a published image.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imagegw.errors import BadRequest, Forbidden
from imagegw.publish.asuser import open_as

SQUASHFS_MAGIC = b"hsqs"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportedFile:
    """The gateway's copy of an imported squashfs."""

    path: Path
    image_id: str
    """sha256 of the file's bytes, hex."""
    size: int


def copy_importable(source: str, uid: int, gid: int, groups: frozenset[int], scratch: Path) -> ImportedFile:
    """Copy a user's squashfs into ``scratch`` (hashing it on the way), if that user may read it."""
    path = Path(source)
    if not path.is_absolute():
        raise BadRequest(f"filepath must be absolute, not {source!r}")
    with os.fdopen(_open_for(source, uid, gid, groups), "rb") as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise BadRequest(f"{source} is not a regular file")
        if reader.read(len(SQUASHFS_MAGIC)) != SQUASHFS_MAGIC:
            raise BadRequest(f"{source} is not a squashfs image")
        reader.seek(0)
        return _copy(reader, scratch / "import.squashfs")


def _open_for(source: str, uid: int, gid: int, groups: frozenset[int]) -> int:
    try:
        return open_as(source, uid, gid, groups)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise Forbidden(f"uid {uid} may not read {source}") from None
        if exc.errno == errno.ELOOP:
            # Links are not followed: the filepath recorded with the image must be the file that was read,
            # not a link its owner can point elsewhere later.
            raise BadRequest(f"{source} is a symbolic link (or loops through some): give the path of the file "
                             "itself") from None
        raise BadRequest(f"cannot open {source}: {exc.strerror}") from None


def _copy(reader: BinaryIO, target: Path) -> ImportedFile:
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    return ImportedFile(path=target, image_id=digest.hexdigest(), size=size)
