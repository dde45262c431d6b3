"""Build an image's squashfs with tar2sqfs (squashfs-tools-ng), and list one back.

The flattened tree is streamed into tar2sqfs through a pipe, so the image is never
unpacked on disk; the result is listed again, and checked path by path against the tree,
before anyone may use it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, cast

from imagegw.build.flatten import ImageTree
from imagegw.build.stream import ImageStream, widen_pipe
from imagegw.config import Compression
from imagegw.disk import disk_errors, full_disk_likely, storage_error, written_back_as_it_grows
from imagegw.errors import ImagegwError, SquashError

_STDERR_TAIL = 2000
_QUEUE_BACKLOG = 100
_MAGIC = b"hsqs"
_SUPERBLOCK_HEAD = 22
"""Bytes of the superblock up to and including the compressor id (a u16 at offset 20)."""
_LZ4 = 5
_TAR_KINDS = {tarfile.DIRTYPE: "d", tarfile.FIFOTYPE: "p", tarfile.CHRTYPE: "c", tarfile.BLKTYPE: "b"}
_KIND_NAMES = {"-": "a file", "d": "a directory", "l": "a symlink", "p": "a FIFO", "c": "a character device",
               "b": "a block device", "s": "a socket"}
_SHOWN_DIFFERENCES = 5
"""Differing paths a failed check names; it counts the rest."""
_NO_SPACE = os.strerror(errno.ENOSPC)

# One line of `unsquashfs -lln -UTC`: type and permissions, uid/gid, size (or a device's
# "major, minor"), date and time, then the path. A name may hold newlines, so a line
# that does not look like this continues the previous path.
_LISTING_LINE = re.compile(
    rb"([-dlpcbs])([-rwxsStT]{9}) (\d+)/(\d+) +(\d+|\d+, *\d+) \d+-\d+-\d+ \d+:\d+ squashfs-root(/.*)?"
)


@dataclass(frozen=True)
class SquashResult:
    """A squashfs file that was built and listed back successfully."""

    path: Path
    size: int
    """Bytes."""
    entries: int
    """Paths in the image, the root excluded."""


class SquashEntry(NamedTuple):
    """One path of a squashfs image, as ``unsquashfs -lln`` lists it."""

    kind: str
    """The ``ls`` type character: ``-`` file, ``d``, ``l``, ``p``, ``c``, ``b``, ``s``."""
    mode: int
    """Permission bits, setuid/setgid/sticky included."""
    uid: int
    gid: int
    size: int
    """A file's bytes, a symlink's target length in bytes; 0 for anything else."""
    target: str | None
    """A symlink's target."""


def build_squashfs(tree: ImageTree, output: Path, compression: Compression, block_size: int = 131072,
                   jobs: int | None = None, timeout: float = 3600) -> SquashResult:
    """Write ``tree`` to the squashfs file ``output`` and check that it holds exactly ``tree``.

    Raises :class:`StorageError` if ``output`` cannot be written (``<output>: No space left
    on device``), :class:`SquashError` if tar2sqfs fails otherwise, runs longer than
    ``timeout`` seconds, or produces an image that differs from ``tree``; either way no
    file is left at ``output``.
    """
    command = _tar2sqfs_command(output, compression, block_size, jobs or os.cpu_count() or 1)
    try:
        with _created(output) as held:
            _run_tar2sqfs(command, tree, output, held, timeout)
        return check_squashfs(output, tree, timeout)
    except BaseException as exc:
        _discard(output, exc)
        raise


def check_squashfs(output: Path, tree: ImageTree, timeout: float = 3600) -> SquashResult:
    """The squashfs file ``output``, once its listing matches ``tree`` path by path.

    Raises SquashError naming the first differing paths (and what differs) if it does not.
    """
    listed = list_squashfs(output, timeout)
    differences = _differences(tree, listed)
    if differences:
        shown = "; ".join(_difference(*difference) for difference in differences[:_SHOWN_DIFFERENCES])
        more = len(differences) - _SHOWN_DIFFERENCES
        raise SquashError(f"{output} does not hold the image: {shown}" + (f"; and {more} more" if more > 0 else ""))
    with disk_errors(output, "reading the size of the squashfs"):
        size = output.stat().st_size
    return SquashResult(output, size, len(listed))


def _differences(tree: ImageTree,
                 listed: dict[str, SquashEntry]) -> list[tuple[str, SquashEntry | None, SquashEntry | None]]:
    """The paths where the squashfs listing ``listed`` differs from ``tree``, sorted, as (path, in the
    image, in the squashfs); empty if it does not differ.

    Each path must be there with the same type, permission bits, owner root, and a file's
    size or a symlink's target. One pass over the tree and one lookup a path: images hold
    10^5 paths.
    """
    differing: list[tuple[str, SquashEntry | None, SquashEntry | None]] = []
    found = 0
    for path, kind, mode, detail in tree.described():
        entry = listed.get(path)
        # Plain tuples: a SquashEntry equals the tuple of its fields, and is costlier to make.
        if kind == "file":
            expected: tuple[str, int, int, int, int, str | None] = ("-", mode & 0o7777, 0, 0, cast(int, detail), None)
        elif kind == "dir":
            expected = ("d", mode & 0o7777, 0, 0, 0, None)
        elif kind == "symlink":
            target = cast(str, detail)
            expected = ("l", 0o777, 0, 0, len(os.fsencode(target)), target)
        else:
            expected = ("p", mode & 0o7777, 0, 0, 0, None)
        if entry is not None:
            found += 1
            if entry == expected:
                continue
        differing.append((path, SquashEntry(*expected), entry))
    if found < len(listed):  # paths the image does not have: a second pass, on failure only
        in_image = {path for path, _, _, _ in tree.described()}
        differing += [(path, None, listed[path]) for path in listed.keys() - in_image]
    differing.sort(key=lambda difference: difference[0])
    return differing


def _difference(path: str, expected: SquashEntry | None, entry: SquashEntry | None) -> str:
    if entry is None:
        return f"{path!r} is {_described(expected)} in the image, missing from the squashfs"
    if expected is None:
        return f"{path!r} is {_described(entry)} in the squashfs, not in the image"
    if entry.kind != expected.kind:
        return f"{path!r} is {_described(expected)} in the image, {_described(entry)} in the squashfs"
    in_image, in_squashfs = [], []
    if entry.mode != expected.mode:
        in_image.append(f"mode {expected.mode:04o}")
        in_squashfs.append(f"mode {entry.mode:04o}")
    if entry.target != expected.target:
        in_image.append(f"target {expected.target!r}")
        in_squashfs.append(f"target {entry.target!r}")
    elif entry.size != expected.size:
        in_image.append(f"{expected.size} bytes")
        in_squashfs.append(f"{entry.size} bytes")
    if (entry.uid, entry.gid) != (expected.uid, expected.gid):
        in_image.append(f"owner {expected.uid}:{expected.gid}")
        in_squashfs.append(f"owner {entry.uid}:{entry.gid}")
    return f"{path!r} has {' and '.join(in_image)} in the image, {' and '.join(in_squashfs)} in the squashfs"


def _described(entry: SquashEntry | None) -> str:
    assert entry is not None  # a difference has an entry on one side at least
    kind = _KIND_NAMES.get(entry.kind, f"an entry of type {entry.kind!r}")
    if entry.kind == "l":
        what = f"{kind} to {entry.target!r}"
    elif entry.kind == "-":
        what = f"{kind} of {entry.size} bytes mode {entry.mode:04o}"
    else:
        what = f"{kind} mode {entry.mode:04o}"
    return what + (f" owned by {entry.uid}:{entry.gid}" if (entry.uid, entry.gid) != (0, 0) else "")


def build_squashfs_streamed(stream: ImageStream, output: Path, compression: Compression, block_size: int = 131072,
                            jobs: int | None = None, timeout: float = 3600) -> SquashResult:
    """Build the squashfs from ``stream`` as it is written; as build_squashfs once the writer ends.

    A spoiled stream (see ``imagegw.build.stream``) is thrown away, and the image built again from
    the tree the writer hands over.
    """
    command = _tar2sqfs_command(output, compression, block_size, jobs or os.cpu_count() or 1)
    try:
        with ExitStack() as resources:
            try:
                held = resources.enter_context(_created(output))
                stderr = resources.enter_context(tempfile.TemporaryFile())
                process = _start_tar2sqfs(command, stream.reader, stderr)
            finally:
                stream.close_reader()
            with _stopped_if_running(process), written_back_as_it_grows(output):
                image = stream.outcome()
                if image.intact:
                    _wait(process, timeout)
            stderr.seek(0)
            message = _tail(stderr.read())
            if image.intact:
                _check_outcome(process.returncode, [], message, output, held)
            elif process.returncode != 0:
                # A full disk also spoils the stream (tar2sqfs stops reading); building again would fill it again.
                _check_space(message, output, held)
        if not image.intact:
            return build_squashfs(image.tree, output, compression, block_size, jobs, timeout)
        return check_squashfs(output, image.tree, timeout)
    except BaseException as exc:
        _discard(output, exc)
        raise


def list_squashfs(path: Path, timeout: float = 3600) -> dict[str, SquashEntry]:
    """Every path of the squashfs image at ``path`` (root excluded, no leading slash)."""
    if _compressor_id(path) == _LZ4:
        # unsquashfs 4.5.1 refuses a metadata block whose compressed form is larger than its
        # content, and tar2sqfs 1.2 compresses the 4-byte id table with lz4 into 5 bytes. The
        # kernel mounts such images; squashfs-tools-ng's own reader lists them.
        return _list_with_sqfs2tar(path, timeout)
    return _list_with_unsquashfs(path, timeout)


def _compressor_id(path: Path) -> int:
    try:
        with path.open("rb") as image:
            superblock = image.read(_SUPERBLOCK_HEAD)
    except OSError as exc:
        raise SquashError(f"cannot list {path}: {exc.strerror}") from None
    if len(superblock) < _SUPERBLOCK_HEAD or superblock[:4] != _MAGIC:
        raise SquashError(f"cannot list {path}: not a squashfs image")
    return int.from_bytes(superblock[20:22], "little")


def _list_with_unsquashfs(path: Path, timeout: float) -> dict[str, SquashEntry]:
    try:
        listing = subprocess.run(["unsquashfs", "-lln", "-UTC", str(path)], capture_output=True,
                                 timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SquashError(f"cannot list {path}: {exc}") from None
    if listing.returncode != 0:
        raise SquashError(f"cannot list {path}: unsquashfs says: {_tail(listing.stderr)}")
    return _parse_listing(path, listing.stdout)


def _list_with_sqfs2tar(path: Path, timeout: float) -> dict[str, SquashEntry]:
    with tempfile.TemporaryFile() as stderr:
        try:
            reader = subprocess.Popen(["sqfs2tar", "--no-skip", "--no-xattr", str(path)],
                                      stdout=subprocess.PIPE, stderr=stderr)
        except OSError as exc:
            raise SquashError(f"cannot list {path}: {exc}") from None
        watchdog = threading.Timer(timeout, reader.kill)
        watchdog.start()
        problem = ""
        # Leaving closes the pipe, which stops sqfs2tar if the stream was not read to its end.
        with reader:
            try:
                entries = _tar_listing(reader.stdout)
            except tarfile.TarError as exc:
                entries, problem = {}, f"unreadable tar stream ({exc})"
            finally:
                watchdog.cancel()
        stderr.seek(0)
        if reader.returncode == -signal.SIGKILL:
            raise SquashError(f"cannot list {path}: sqfs2tar did not finish within {timeout:g} s")
        if reader.returncode != 0 or problem:
            raise SquashError(f"cannot list {path}: sqfs2tar says: {_tail(stderr.read()) or problem}")
    return entries


def _tar_listing(stream: IO[bytes] | None) -> dict[str, SquashEntry]:
    entries: dict[str, SquashEntry] = {}
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        while (info := archive.next()) is not None:
            archive.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every member; images have 200k
            # sqfs2tar writes a hard-linked file once, then links to that first name.
            entries[info.name] = entries[info.linkname] if info.islnk() else _tar_entry(info)
    return entries


def _tar_entry(info: tarfile.TarInfo) -> SquashEntry:
    if info.issym():
        return SquashEntry("l", info.mode, info.uid, info.gid, len(os.fsencode(info.linkname)), info.linkname)
    kind = "-" if info.isreg() else _TAR_KINDS[info.type]
    return SquashEntry(kind, info.mode, info.uid, info.gid, info.size if kind == "-" else 0, None)


def _tar2sqfs_command(output: Path, compression: Compression, block_size: int, jobs: int) -> list[str]:
    command = ["tar2sqfs", "--compressor", compression.algorithm]
    if compression.level is not None:
        command += ["--comp-extra", f"level={compression.level}"]
    return command + [
        "--block-size", str(block_size), "--num-jobs", str(jobs),
        # The default backlog (10 blocks a job) stalls the reader while blocks compress; 100
        # blocks (12.5 MiB at the default size) keep it reading, and large layers build faster.
        "--queue-backlog", str(_QUEUE_BACKLOG),
        # Owners are root and xattrs dropped already; these keep tar2sqfs's own choices the same.
        "--defaults", "uid=0,gid=0,mode=0755", "--no-xattr",
        # A record tar2sqfs cannot read must fail the build, not vanish from the image.
        "--no-skip", "--force", "--quiet", str(output),
    ]


def _run_tar2sqfs(command: list[str], tree: ImageTree, output: Path, held: int, timeout: float) -> None:
    with tempfile.TemporaryFile() as stderr:
        process = _start_tar2sqfs(command, subprocess.PIPE, stderr)
        assert process.stdin is not None  # asked for with stdin=PIPE
        widen_pipe(process.stdin.fileno())
        failures: list[BaseException] = []
        # A thread feeds the pipe so that tar reading and compressing run on different cores.
        feeder = threading.Thread(target=_feed, args=(tree, process.stdin, failures), daemon=True)
        feeder.start()
        try:
            # Stopping tar2sqfs also unblocks the feeder: its next write to the pipe fails.
            with _stopped_if_running(process), written_back_as_it_grows(output):
                _wait(process, timeout)
        finally:
            feeder.join()
        stderr.seek(0)
        _check_outcome(process.returncode, failures, _tail(stderr.read()), output, held)


def _start_tar2sqfs(command: list[str], stdin: int, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(command, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr, bufsize=0)
    except OSError as exc:
        raise SquashError(f"cannot run tar2sqfs: {exc}") from None


@contextmanager
def _created(output: Path) -> Iterator[int]:
    """``output`` created (or emptied) for tar2sqfs, and held open until the block ends.

    Created here, a file the disk cannot take fails as a StorageError before tar2sqfs runs.
    Held open, the file tar2sqfs deletes when a write fails keeps its space while
    ``_check_space`` looks at the disk (tar2sqfs opens the same file: it does not replace it).
    """
    with disk_errors(output, "creating the squashfs"):
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def _discard(output: Path, failure: BaseException) -> None:
    """Remove what a failed build left at ``output``."""
    try:
        output.unlink(missing_ok=True)
    except OSError as exc:
        raise storage_error(exc, output, f"removing it after the build failed: {failure}") from failure


@contextmanager
def _stopped_if_running(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """However the block ends, tar2sqfs has ended after it (killed if need be)."""
    try:
        yield
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()


def _wait(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise SquashError(f"tar2sqfs did not finish within {timeout:g} s and was stopped") from None


def _feed(tree: ImageTree, pipe: IO[bytes], failures: list[BaseException]) -> None:
    try:
        tree.write_tar(pipe)
    except BaseException as exc:  # handed over to the thread that waits for tar2sqfs
        failures.append(exc)
    finally:
        with suppress(OSError):
            pipe.close()


def _check_outcome(returncode: int, failures: list[BaseException], stderr: str, output: Path, held: int) -> None:
    # A broken pipe only echoes tar2sqfs stopping; any other feeder failure is the cause,
    # even if tar2sqfs made an image from the part of the stream it got.
    for failure in failures:
        if isinstance(failure, ImagegwError):
            raise failure
        if not isinstance(failure, BrokenPipeError):
            raise SquashError(f"feeding the image to tar2sqfs failed: {failure}") from failure
    if returncode != 0:
        _check_space(stderr, output, held)
        raise SquashError(f"tar2sqfs failed (exit status {returncode}): {stderr or 'no message'}")
    if failures:
        raise SquashError("tar2sqfs stopped reading the image before its end")


def _check_space(stderr: str, output: Path, held: int) -> None:
    """Raise StorageError if tar2sqfs, which said ``stderr``, failed because ``output``'s disk is full.

    squashfs-tools-ng 1.2 reports a failed write as "<name>: <step>: I/O error." (the name is
    the output's or a member's), without the system's reason; a full disk then tells it.
    ``held`` is ``output`` open: its space stays taken after tar2sqfs deletes it.
    """
    if _NO_SPACE not in stderr:  # the C library's words, for a call that keeps its errno
        if "I/O error" not in stderr:
            return
        try:
            disk = os.fstatvfs(held)
        except OSError:
            return
        if not full_disk_likely(disk.f_bavail * disk.f_frsize):
            return
    raise storage_error(OSError(errno.ENOSPC, _NO_SPACE), output, f"tar2sqfs says: {stderr}")


def _tail(stderr: bytes) -> str:
    return stderr[-_STDERR_TAIL:].decode("utf-8", "replace").strip()


def _parse_listing(path: Path, listing: bytes) -> dict[str, SquashEntry]:
    records: list[list[bytes]] = []  # [type, permissions, uid, gid, size, path]
    for line in listing.removesuffix(b"\n").split(b"\n"):
        match = _LISTING_LINE.fullmatch(line)
        if match:
            records.append(list(match.groups(b"")))
        elif records:
            records[-1][5] += b"\n" + line
        else:
            raise SquashError(f"cannot list {path}: unexpected unsquashfs output {line[:200]!r}")
    if not records or records[0][5]:
        raise SquashError(f"cannot list {path}: unsquashfs did not list the root directory")
    return dict(_entry(path, record) for record in records[1:])


def _entry(path: Path, record: list[bytes]) -> tuple[str, SquashEntry]:
    kind, permissions, uid, gid, size_field, name = record
    size = int(size_field) if kind in b"-l" else 0
    target = None
    if kind == b"l":
        # The listed size of a symlink is its target's length: that splits "name -> target"
        # even when the name or the target contains " -> ".
        split = len(name) - size
        name, arrow, target_bytes = name[:split - 4], name[split - 4:split], name[split:]
        if arrow != b" -> ":
            raise SquashError(f"cannot list {path}: unexpected symlink line for {name!r}")
        target = target_bytes.decode("utf-8", "surrogateescape")
    entry = SquashEntry(kind.decode(), _mode(permissions.decode()), int(uid), int(gid), size, target)
    return name[1:].decode("utf-8", "surrogateescape"), entry


def _mode(permissions: str) -> int:
    """Mode bits from an ``ls`` permission string such as ``rwsr-xr-t``."""
    mode = 0
    for index, special in enumerate((0o4000, 0o2000, 0o1000)):
        read, write, execute = permissions[3 * index], permissions[3 * index + 1], permissions[3 * index + 2]
        shift = 6 - 3 * index
        mode |= (read == "r") << (shift + 2) | (write == "w") << (shift + 1) | (execute in "xst") << shift
        if execute in "sStT":
            mode |= special
    return mode
