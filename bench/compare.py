"""Check that two squashfs files hold the same file tree.

Both are read back with ``sqfs2tar`` (squashfs-tools-ng reads what mksquashfs and tar2sqfs
write) and compared by path: type, permission bits, owner, size, symlink target and a SHA-256
of each regular file's content. Differences the two pipelines are expected to have are
normalised and counted instead of reported:

* mtimes are ignored (mksquashfs keeps the layers', tar2sqfs gets them from imagegw);
* imagegw strips setuid/setgid bits and makes everything readable (``a+rX``): both sides
  are compared after applying that, and the entries it changed are counted;
* imagegw drops device nodes: those only in (a) are counted, not reported;
* the root directory is not compared (umoci gives it the bundle's mode).
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
         tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev"}


class Entry(NamedTuple):
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    target: str
    sha256: str

    def describe(self) -> str:
        extra = f" -> {self.target}" if self.kind == "symlink" else f" {self.size} B {self.sha256[:12]}" \
            if self.kind == "file" else ""
        return f"{self.kind} {self.mode:04o} {self.uid}:{self.gid}{extra}"


def read_tree(squashfs: Path) -> dict[str, Entry]:
    """Every path of the image (root excluded), read through ``sqfs2tar``."""
    process = subprocess.Popen(["sqfs2tar", "--no-skip", "--no-xattr", str(squashfs)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    entries: dict[str, Entry] = {}
    assert process.stdout is not None
    with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
        for info in archive:
            archive.members.clear()  # type: ignore[attr-defined]  # do not keep 100k TarInfos
            name = info.name.removeprefix("./").strip("/")
            if not name:
                continue
            if info.islnk():
                entries[name] = entries[info.linkname.removeprefix("./").strip("/")]
                continue
            digest = ""
            if info.isreg():
                hasher = hashlib.sha256()
                reader = archive.extractfile(info)
                assert reader is not None
                while chunk := reader.read(1 << 20):
                    hasher.update(chunk)
                digest = hasher.hexdigest()
            kind = KINDS.get(info.type, f"type {info.type!r}")
            entries[name] = Entry(kind, info.mode & 0o7777, info.uid, info.gid,
                                  info.size if kind == "file" else 0, info.linkname if kind == "symlink" else "",
                                  digest)
    stderr = process.stderr.read() if process.stderr else b""
    if process.wait() != 0:
        raise RuntimeError(f"sqfs2tar {squashfs} failed: {stderr.decode(errors='replace')[-2000:]}")
    return entries


def normalise_mode(entry: Entry) -> int:
    """The mode imagegw gives an entry: setuid/setgid stripped, then a+rX."""
    mode = entry.mode & ~0o6000
    if entry.kind == "symlink":
        return 0o777
    mode |= 0o444
    if entry.kind == "dir" or mode & 0o111:
        mode |= 0o111
    return mode


@dataclass
class Comparison:
    entries_a: int = 0
    entries_b: int = 0
    setid_stripped: int = 0
    modes_normalised: int = 0
    devices_dropped: int = 0
    differences: list[str] = field(default_factory=list)
    difference_count: int = 0

    @property
    def same(self) -> bool:
        return self.difference_count == 0

    def verdict(self) -> str:
        notes = (f"{self.entries_b} entries; setuid/setgid stripped on {self.setid_stripped}, "
                 f"a+rX changed {self.modes_normalised}, devices dropped {self.devices_dropped}")
        return f"SAME ({notes})" if self.same else f"DIFFERENT: {self.difference_count} differences ({notes})"


def compare_trees(a: dict[str, Entry], b: dict[str, Entry], limit: int = 20) -> Comparison:
    """(a) skopeo+umoci+mksquashfs against (b) imagegw."""
    result = Comparison(entries_a=len(a), entries_b=len(b))

    def differ(text: str) -> None:
        result.difference_count += 1
        if len(result.differences) < limit:
            result.differences.append(text)

    for path in sorted(a.keys() | b.keys()):
        left, right = a.get(path), b.get(path)
        if left is not None and left.kind in ("chardev", "blockdev"):
            result.devices_dropped += right is None
            if right is None:
                continue
        if left is None:
            differ(f"only in imagegw: /{path} ({right.describe()})")  # type: ignore[union-attr]
            continue
        if right is None:
            differ(f"only in skopeo+umoci: /{path} ({left.describe()})")
            continue
        if left.mode & 0o6000:
            result.setid_stripped += 1
        expected = normalise_mode(left)
        if expected != left.mode and left.kind != "symlink":
            result.modes_normalised += 1
        problems = []
        if left.kind != right.kind:
            problems.append(f"type {left.kind} vs {right.kind}")
        else:
            if left.kind != "symlink" and expected != normalise_mode(right):
                problems.append(f"mode {left.mode:04o} (normalised {expected:04o}) vs {right.mode:04o}")
            if (left.uid, left.gid) != (right.uid, right.gid):
                problems.append(f"owner {left.uid}:{left.gid} vs {right.uid}:{right.gid}")
            if left.size != right.size or left.sha256 != right.sha256:
                problems.append(f"content {left.size} B {left.sha256[:12]} vs {right.size} B {right.sha256[:12]}")
            if left.target != right.target:
                problems.append(f"target {left.target!r} vs {right.target!r}")
        if problems:
            differ(f"/{path}: " + "; ".join(problems))
    return result


def compare_squashfs(a: Path, b: Path) -> Comparison:
    return compare_trees(read_tree(a), read_tree(b))
