"""Apply OCI image layers to an in-memory model of the image, then write it as one tar stream.

Nothing is extracted. The model holds each path's metadata and, for a regular file, where
its bytes lie in a layer tar; ``ImageTree.write_tar`` streams the result to tar2sqfs. As no
entry is ever written to the host's filesystem, no entry can land outside the image root:
hostile names and links can only move things around inside the model, and the rules below
say where they land (the same places umoci, containerd and securejoin would put them).
"""

from __future__ import annotations

import logging
import marshal
import os
import tarfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, cast, overload

from imagegw.build.tarscan import Header, bounded_tarinfo, scan_headers, too_many_entries
from imagegw.build.tarwrite import TAR_BLOCK, TarWriter, encode_header
from imagegw.config import Limits, limit_exceeded
from imagegw.errors import LayerError, LimitExceeded, UnsafeLayerEntry

_log = logging.getLogger(__name__)

_MAX_LINK_HOPS = 40
"""Symbolic links followed while resolving one path: Linux's limit, so loops end the same way."""

WHITEOUT = ".wh."
"""A layer entry named .wh.<name> deletes <name> of the layers below."""
OPAQUE = ".wh..wh..opq"
"""A layer entry of this name in a directory hides everything the layers below have in it."""
_AUFS_META = ".wh..wh."


class _Dir:
    __slots__ = ("mode", "mtime", "children")

    def __init__(self, mode: int, mtime: int) -> None:
        self.mode = mode
        self.mtime = mtime
        self.children: dict[str, _Node] = {}


class _File:
    """A regular file's inode: every hard link to it holds this same object."""

    __slots__ = ("mode", "mtime", "layer", "offset", "size", "sparse")

    def __init__(self, mode: int, mtime: int, layer: int, offset: int, size: int,
                 sparse: tuple[tuple[int, int], ...] | None) -> None:
        self.mode = mode
        self.mtime = mtime
        self.layer = layer
        self.offset = offset
        self.size = size
        self.sparse = sparse


class _Symlink:
    __slots__ = ("mtime", "target")

    def __init__(self, mtime: int, target: str) -> None:
        self.mtime = mtime
        self.target = target


class _Fifo:
    __slots__ = ("mode", "mtime")

    def __init__(self, mode: int, mtime: int) -> None:
        self.mode = mode
        self.mtime = mtime


_Node = _Dir | _File | _Symlink | _Fifo


@dataclass(frozen=True)
class LayerSource:
    """One layer of an image, as an uncompressed tar in the layer cache."""

    path: Path
    digest: str


def flatten_layers(layers: Sequence[LayerSource], warn: Callable[[str], None] | None = None,
                   limits: Limits = Limits()) -> ImageTree:
    """Apply ``layers`` (base first) with OCI semantics and return the resulting file tree.

    ``warn`` hears about entries that were changed or dropped (names climbing above the
    root, devices, ...); by default they are logged. An entry that cannot be obeyed safely
    raises :class:`UnsafeLayerEntry`, an unreadable tar :class:`LayerError`, too many
    entries, too large a header or too deep a path :class:`LimitExceeded`.
    """
    root = _Dir(0o755, 0)
    entries = 0
    for index, layer in enumerate(layers):
        members = read_members(layer, limits)
        entries = count_entries(entries, members, layer, limits)
        _LayerApplier(root, index, layer, warn or _log.warning, limits.path_depth).apply(members)
    return ImageTree(root, layers)


def count_entries(so_far: int, members: Sequence[Header], layer: LayerSource, limits: Limits) -> int:
    """The image's tar entries up to and including ``layer``'s, which follows layers holding ``so_far``;
    refused past ``limits.entries``, as each entry costs the model memory."""
    total = so_far + len(members)
    if total > limits.entries:
        raise limit_exceeded(f"layer {layer.digest} brings the image's tar entries to {total}", "maxEntries",
                             limits.entries)
    return total


class ImageTree:
    """The final filesystem of an image: metadata in memory, file data in the layer tars."""

    def __init__(self, root: _Dir, layers: Sequence[LayerSource]) -> None:
        self._root = root
        self._layers = tuple(layers)
        self.entries = 0
        """Paths in the tree, the root excluded."""
        self.file_bytes = 0
        """Sum of regular-file sizes; data shared by hard links counts once."""
        seen: set[int] = set()
        for _, node in _walk(root):
            self.entries += 1
            if isinstance(node, _File) and id(node) not in seen:
                seen.add(id(node))
                self.file_bytes += node.size

    def paths(self) -> dict[str, tuple[str, int, int | str | None]]:
        """Every path (root excluded) mapped to ``(kind, mode, detail)``, as ``described`` gives them."""
        return {path: (kind, mode, detail) for path, kind, mode, detail in self.described()}

    def described(self) -> Iterator[tuple[str, str, int, int | str | None]]:
        """Every path (root excluded) as ``(path, kind, mode, detail)``, in no set order.

        ``kind`` is ``"dir"``, ``"file"`` (each path of a hard link group), ``"symlink"`` or
        ``"fifo"``; ``mode`` the permission bits ``write_tar`` writes (a symlink's are 0777);
        ``detail`` a file's size, a symlink's target, else ``None``. Cheaper than ``paths``
        or a sorted walk: it builds no dictionary and sorts nothing.
        """
        pending: list[tuple[str, _Dir]] = [("", self._root)]
        while pending:
            prefix, directory = pending.pop()
            for name, node in directory.children.items():
                path = prefix + name
                if isinstance(node, _File):
                    yield path, "file", node.mode, node.size
                elif isinstance(node, _Dir):
                    yield path, "dir", node.mode, None
                    pending.append((path + "/", node))
                elif isinstance(node, _Symlink):
                    yield path, "symlink", 0o777, node.target
                else:
                    yield path, "fifo", node.mode, None

    def write_tar(self, out: IO[bytes], written: Collection[str] = ()) -> None:
        """Write the tree to ``out`` (a file or pipe) as one PAX tar, end blocks included.

        Paths come in sorted pre-order, so every directory precedes its children; a hard
        link group's data is written at its first path, and later paths are links to it.
        ``written`` are regular files already in the stream (see ``imagegw.build.stream``): they
        are skipped, and the hard links to them point at them.
        """
        out.flush()
        data_paths = {id(self._node_at(path)): path for path in written}
        with ExitStack() as files:
            layer_fds = [files.enter_context(open(layer.path, "rb")).fileno() for layer in self._layers]
            archives: dict[int, tarfile.TarFile] = {}
            writer = TarWriter(out.fileno())
            if not written:
                writer.write(_header("./", self._root))
            for path, node in _walk(self._root):
                if isinstance(node, _File) and id(node) in data_paths:
                    if data_paths[id(node)] != path:
                        writer.write(_link_header(path, node, data_paths[id(node)]))
                    continue
                writer.write(_header(path, node))
                if isinstance(node, _File):
                    data_paths[id(node)] = path
                    if node.sparse is not None:
                        self._copy_sparse(writer, files, archives, node)
                    else:
                        writer.copy(layer_fds[node.layer], node.offset, node.size, self._describe(node, path))
                    writer.pad(node.size)
            if written:  # tar2sqfs takes the root's attributes from a late "./" as well
                writer.write(_header("./", self._root))
            writer.end()

    def file_at(self, path: str) -> tuple[int, int] | None:
        """(layer index, data offset) of the regular file at ``path`` (no symlinks followed), else None."""
        node = self._node_at(path)
        return (node.layer, node.offset) if isinstance(node, _File) and node.sparse is None else None

    def _node_at(self, path: str) -> _Node | None:
        node: _Node | None = self._root
        for name in path.split("/"):
            node = node.children.get(name) if isinstance(node, _Dir) else None
        return node

    def _describe(self, node: _File, path: str) -> str:
        return f"layer {self._layers[node.layer].digest}: {path!r}"

    def _copy_sparse(self, writer: TarWriter, files: ExitStack, archives: dict[int, tarfile.TarFile],
                     node: _File) -> None:
        """Copy a sparse member's expanded content; tarfile knows the sparse map formats."""
        if node.layer not in archives:
            archives[node.layer] = files.enter_context(tarfile.open(self._layers[node.layer].path, "r:"))
        archive = archives[node.layer]
        info = tarfile.TarInfo()
        info.type, info.offset_data, info.size = tarfile.REGTYPE, node.offset, node.size
        info.sparse = list(node.sparse or ())  # type: ignore[assignment]  # typeshed says bytes: it is extents
        data = archive.extractfile(info)
        assert data is not None  # a regular member always has a file object
        writer.copy_stream(data)


def _walk(root: _Dir) -> Iterator[tuple[str, _Node]]:
    """Every path below ``root`` in sorted pre-order (iterative: images can be deeper than the recursion limit)."""
    stack: list[tuple[str, _Node]] = sorted(root.children.items(), reverse=True)
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, _Dir):
            stack.extend((f"{path}/{name}", child) for name, child in sorted(node.children.items(), reverse=True))


def _header(path: str, node: _Node) -> bytes:
    if isinstance(node, _Dir):
        return encode_header(path, tarfile.DIRTYPE, node.mode, node.mtime)
    if isinstance(node, _File):
        return encode_header(path, tarfile.REGTYPE, node.mode, node.mtime, size=node.size)
    if isinstance(node, _Symlink):
        return encode_header(path, tarfile.SYMTYPE, 0o777, node.mtime, linkname=node.target)
    return encode_header(path, tarfile.FIFOTYPE, node.mode, node.mtime)


def file_header(path: str, mode: int, mtime: int, size: int) -> bytes:
    """The header ``write_tar`` gives the regular file at ``path`` made from a member with these fields."""
    return encode_header(path, tarfile.REGTYPE, _file_mode(mode), int(mtime), size=size)


def _link_header(path: str, node: _File, first_path: str) -> bytes:
    return encode_header(path, tarfile.LNKTYPE, node.mode, node.mtime, linkname=first_path)


_MEMBERS_FORMAT = 1
"""Bump when Header changes: older member files are then re-read from the tar."""


def prepare_layer(source: LayerSource, limits: Limits = Limits()) -> None:
    """Read a layer's tar headers once and keep them beside it, so flattening need not read them.

    Raises LayerError for a tar that cannot be read, LimitExceeded for one past ``limits``: better
    found while the other layers still download than after.
    """
    read_members(source, limits)


def read_members(source: LayerSource, limits: Limits = Limits()) -> list[Header]:
    """A layer's entries in tar order, from its member file when one was written before.

    A layer of more entries than ``limits.entries`` or with a header larger than
    ``limits.header_bytes`` raises LimitExceeded (its reading stops there, so memory stays bounded).
    """
    members = _cached_members(source)
    if members is None:
        members = _scan(source, limits)
        _write_members(_members_path(source), members)
    elif len(members) > limits.entries:  # read under a higher limit
        raise _in_layer(source, too_many_entries(limits))
    return members


def _cached_members(source: LayerSource) -> list[Header] | None:
    try:
        version, rows = marshal.loads(_members_path(source).read_bytes())
        if version == _MEMBERS_FORMAT:
            return [Header(*row) for row in rows]
    except (OSError, ValueError, EOFError, TypeError):
        pass
    return None


def _in_layer(source: LayerSource, refusal: LimitExceeded) -> LimitExceeded:
    """A refusal from reading a tar, naming the layer it is."""
    return LimitExceeded(f"layer {source.digest}: {refusal}")


def _members_path(source: LayerSource) -> Path:
    return source.path.with_name(source.path.name + ".members")


def _scan(source: LayerSource, limits: Limits) -> list[Header]:
    try:
        headers = scan_headers(source.path, limits)
        if headers is None:
            # Sparse files, global PAX headers, damage: tarfile reads (or rejects) what the fast reader does not.
            headers = _scan_with_tarfile(source, limits)
    except LimitExceeded as refusal:
        raise _in_layer(source, refusal) from None
    except OSError as exc:
        raise LayerError(f"layer {source.digest}: unreadable tar: {exc}") from None
    return headers


def _scan_with_tarfile(source: LayerSource, limits: Limits) -> list[Header]:
    members: list[Header] = []
    try:
        with tarfile.open(source.path, "r:", tarinfo=bounded_tarinfo(limits.header_bytes)) as archive:
            while (info := archive.next()) is not None:
                # TarFile keeps every member it reads; a layer can hold 200k of them.
                archive.members.clear()  # type: ignore[attr-defined]
                if len(members) == limits.entries:
                    raise too_many_entries(limits)
                members.append(_member(info))
            end = archive.offset
        _check_end(source, end)
    except tarfile.TarError as exc:
        raise LayerError(f"layer {source.digest}: unreadable tar: {exc}") from None
    return members


def _member(info: tarfile.TarInfo) -> Header:
    # tarfile's isreg() also covers AREGTYPE, CONTTYPE and GNU sparse members: one type for all.
    kind = tarfile.REGTYPE if info.isreg() else info.type
    # typeshed says bytes; tarfile stores (offset, size) extents
    extents = cast("list[tuple[int, int]] | None", info.sparse)
    sparse = None if extents is None else tuple((start, length) for start, length in extents)
    return Header(info.name, kind, info.mode, int(info.mtime), info.size, info.offset_data, info.linkname, sparse)


def _check_end(source: LayerSource, offset: int) -> None:
    # tarfile stops quietly at the first bad header after the first one; only zeros
    # (or nothing) may follow the last member, else the layer was cut short or damaged.
    with open(source.path, "rb") as layer:
        layer.seek(offset)
        rest = layer.read(TAR_BLOCK)
    if rest.strip(b"\0"):
        raise LayerError(f"layer {source.digest}: unreadable tar: invalid header at byte {offset}")


def _write_members(path: Path, members: list[Header]) -> None:
    # Written aside and renamed: a reader sees the whole file or none. A cache that cannot
    # be written to only costs the next pull a re-read.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        temporary.write_bytes(marshal.dumps((_MEMBERS_FORMAT, [tuple(member) for member in members])))
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


class _LayerApplier:
    """Applies one layer to the model and remembers what this layer touched.

    ``touched`` holds the (directory, name) pairs this layer created, replaced or walked
    through (implicit parents included). It is what lets whiteouts and opaque markers act
    on lower layers only, wherever they come in the layer's tar.
    """

    def __init__(self, root: _Dir, index: int, source: LayerSource, warn: Callable[[str], None],
                 max_depth: int) -> None:
        self.root = root
        self.index = index
        self.source = source
        self.warn = warn
        self.max_depth = max_depth
        """Names an entry's path may have, symbolic links followed (Limits.path_depth)."""
        self.touched: set[tuple[_Dir, str]] = set()

    def apply(self, members: Sequence[Header]) -> None:
        """Apply the layer's entries, ``members`` in tar order."""
        for member in members:
            self._entry(member)

    def _entry(self, member: Header) -> None:
        parts = self._clean(member.name, repr(member.name))
        if not parts:
            self._root_entry(member)
        elif any(part.startswith(_AUFS_META) for part in parts[:-1]):
            return  # inside aufs bookkeeping (.wh..wh.plnk/...), not image content
        elif parts[-1].startswith(WHITEOUT):
            self._whiteout(parts, member.name)
        else:
            node = self._node(member)
            if node is not None:
                self._place(self._resolve(parts[:-1], member.name, create=True), parts[-1], node)

    def _clean(self, name: str, what: str) -> list[str]:
        """``name`` as path components below the root: ``..`` cannot climb above it (``what`` says so)."""
        parts, clamped = lexical_parts(name)
        if clamped:
            self.warn(f"layer {self.source.digest}: {what} climbs above the image root; kept inside it")
        return parts

    def _root_entry(self, member: Header) -> None:
        if member.isdir():
            self.root.mode, self.root.mtime = _dir_mode(member.mode), int(member.mtime)
        else:
            # CVE-2021-29136: a "." symlink would make the root itself point elsewhere.
            self.warn(f"layer {self.source.digest}: dropped {member.name!r}: only a directory can be the image root")

    def _node(self, member: Header) -> _Node | None:
        """The model node for an entry, or None (with a warning) if the image must not have it."""
        mtime = int(member.mtime)
        if member.isreg():
            return _File(_file_mode(member.mode), mtime, self.index, member.offset_data, member.size, member.sparse)
        if member.isdir():
            return _Dir(_dir_mode(member.mode), mtime)
        if member.issym():
            return _Symlink(mtime, member.linkname)
        if member.islnk():
            return self._link_target(member)
        if member.isfifo():
            return _Fifo(_file_mode(member.mode), mtime)
        what = "device" if member.ischr() or member.isblk() else f"entry of tar type {member.type!r}"
        self.warn(f"layer {self.source.digest}: dropped {what} {member.name!r}")
        return None

    def _link_target(self, member: Header) -> _Node:
        """What a hard link names: the same inode for a file, a copy for a symlink or FIFO."""
        parts = self._clean(member.linkname, f"hard link {member.name!r} -> {member.linkname!r}")
        target: _Node | None = self.root
        if parts:
            parent = self._resolve(parts[:-1], member.name, create=False)
            # The last component is not followed: a link to a symlink links the symlink.
            target = None if parent is None else parent.children.get(parts[-1])
        if isinstance(target, _File):
            return target
        if isinstance(target, _Symlink):
            return _Symlink(target.mtime, target.target)
        if isinstance(target, _Fifo):
            return _Fifo(target.mode, target.mtime)
        problem = "does not exist" if target is None else "is a directory"
        raise UnsafeLayerEntry(
            f"layer {self.source.digest}: hard link {member.name!r} -> {member.linkname!r}: the target {problem}"
        )

    @overload
    def _resolve(self, parts: list[str], entry: str, *, create: Literal[True]) -> _Dir: ...

    @overload
    def _resolve(self, parts: list[str], entry: str, *, create: Literal[False]) -> _Dir | None: ...

    def _resolve(self, parts: list[str], entry: str, *, create: bool) -> _Dir | None:
        """The directory ``parts`` leads to, following symlinks inside the model like securejoin.

        Missing directories are created (0755) if ``create``, else the answer is None.
        """
        walked: list[tuple[_Dir, str]] = []  # the directories above the current one, with their names
        current = self.root
        pending = parts[::-1]
        hops = 0
        while pending:
            name = pending.pop()
            if name == "..":
                if walked:
                    current = walked.pop()[0]
                continue
            if name in ("", "."):
                continue
            child = current.children.get(name)
            if child is None:
                if not create:
                    return None
                child = current.children[name] = _Dir(0o755, 0)
            if isinstance(child, _Dir):
                if create:
                    self.touched.add((current, name))
                walked.append((current, name))
                current = child
                if create and len(walked) >= self.max_depth:  # the entry itself goes one deeper
                    raise self._too_deep(entry)
            elif isinstance(child, _Symlink):
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise UnsafeLayerEntry(f"layer {self.source.digest}: {entry!r}: too many levels of symbolic links")
                if child.target.startswith("/"):
                    current, walked = self.root, []
                pending.extend(reversed(child.target.split("/")))
            else:
                where = "/".join([n for _, n in walked] + [name])
                raise UnsafeLayerEntry(f"layer {self.source.digest}: {entry!r}: parent {where!r} is not a directory")
        return current

    def _too_deep(self, entry: str) -> LimitExceeded:
        # Only the start of the name: one this deep is kilobytes long.
        shown = entry if len(entry) <= 100 else entry[:100] + "..."
        return limit_exceeded(f"layer {self.source.digest}: {shown!r} lies more than {self.max_depth} names deep "
                              "(symbolic links followed)", "maxPathDepth", self.max_depth)

    def _place(self, parent: _Dir, name: str, node: _Node) -> None:
        existing = parent.children.get(name)
        if isinstance(node, _Dir) and isinstance(existing, _Dir):
            existing.mode, existing.mtime = node.mode, node.mtime
        else:
            parent.children[name] = node
        self.touched.add((parent, name))

    def _whiteout(self, parts: list[str], entry: str) -> None:
        name = parts[-1]
        if name == OPAQUE:
            directory = self._resolve(parts[:-1], entry, create=False)
            if directory is not None:
                self._hide_lower(directory)
            return
        if name.startswith(_AUFS_META):
            return  # aufs bookkeeping such as .wh..wh.plnk: carries no image content
        hidden = name[len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise UnsafeLayerEntry(f"layer {self.source.digest}: {entry!r}: invalid whiteout (it names no file)")
        parent = self._resolve(parts[:-1], entry, create=False)
        # A whiteout hides lower layers only: what this layer put there stays.
        if parent is not None and (parent, hidden) not in self.touched:
            parent.children.pop(hidden, None)

    def _hide_lower(self, directory: _Dir) -> None:
        """Opaque directory: keep only what this layer put below it, as if the marker came first."""
        pending = [directory]
        while pending:
            current = pending.pop()
            for name, child in list(current.children.items()):
                if (current, name) not in self.touched:
                    del current.children[name]
                elif isinstance(child, _Dir):
                    pending.append(child)


def lexical_parts(name: str) -> tuple[list[str], bool]:
    """``name`` as path components below the root, ``..`` applied to the names before it; and
    whether a ``..`` tried to climb above the root (it is dropped)."""
    parts: list[str] = []
    clamped = False
    for part in name.split("/"):
        if part == "..":
            if parts:
                parts.pop()
            else:
                clamped = True
        elif part not in ("", "."):
            parts.append(part)
    return parts, clamped


def _file_mode(mode: int) -> int:
    """Permission bits of a non-directory: no setuid/setgid, readable by all, executable by all if by any."""
    mode &= 0o1777
    mode |= 0o444
    if mode & 0o111:
        mode |= 0o111
    return mode


def _dir_mode(mode: int) -> int:
    """Permission bits of a directory: no setuid/setgid, and everyone may list and enter it."""
    return (mode & 0o1777) | 0o555
