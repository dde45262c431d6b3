"""Read a squashfs back as a tree, through squashfs-tools-ng's sqfs2tar, for assertions."""

from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file", "symlink", "hardlink", "fifo"
    mode: int
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0


_KINDS = {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "file", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink", tarfile.FIFOTYPE: "fifo"}


def read_tree(squashfs: Path) -> dict[str, Entry]:
    """Every path in the image (no leading ``/``, root excluded) with its type, mode, content or target."""
    tar_bytes = subprocess.run(["sqfs2tar", "--no-xattr", str(squashfs)], check=True,
                               capture_output=True).stdout
    tree: dict[str, Entry] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        for member in archive:
            name = member.name.strip("/").removeprefix("./")
            if not name or name == ".":
                continue
            data = archive.extractfile(member).read() if member.isreg() else b""
            tree[name] = Entry(kind=_KINDS.get(member.type, repr(member.type)), mode=member.mode & 0o7777,
                               data=data, target=member.linkname, uid=member.uid, gid=member.gid)
    return tree
