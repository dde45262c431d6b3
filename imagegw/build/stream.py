"""Flatten an image's layers from the top down into one tar stream, while they still download.

A layer's files can go into the image as soon as every layer above it is known: what those
layers replace, delete or make opaque is then known, and nothing below can hide a file. So
the top layer is written first, and each layer below follows as it arrives, keeping tar2sqfs
compressing while lower layers still decompress. Once every layer is in, the rest (lower
layers' files, directories, links) is written from the exact model of ``imagegw.build.flatten``;
when all layers are cached already, that is the whole image.

What a top-down pass cannot know is checked, not assumed: a symbolic link in a lower layer
that moves a path, a name that comes twice in one layer, anything only ``tarfile`` reads.
Once every layer is in, each streamed file must be exactly where the bottom-up model puts
it; if one is not, the stream is spoiled and the image is built again from the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from imagegw.build.arrivals import LayerArrivals
from imagegw.build.flatten import (
    OPAQUE,
    WHITEOUT,
    ImageTree,
    LayerSource,
    TarWriter,
    data_cut_short,
    file_header,
    flatten_layers,
    lexical_parts,
    read_members,
)
from imagegw.build.tarscan import Header, ReadWindow, follow_headers

_SMALL_FILE = 16 << 10
"""Files up to this size are copied from the read window; larger ones go to the pipe by sendfile."""


@dataclass(frozen=True)
class StreamedImage:
    """What the top-down pass wrote, and the exact tree it was checked against."""

    tree: ImageTree
    streamed_files: int
    """Regular files written ahead of the model."""
    intact: bool
    """The stream holds the whole tree, end blocks included; if not, it must be thrown away."""


def flatten_top_down(arrivals: LayerArrivals, out: int, warn: Callable[[str], None] | None = None) -> StreamedImage:
    """Write the image of the layers in ``arrivals`` (base first) to the descriptor ``out`` as one tar.

    Returns once every layer is in and the stream is complete, or is known to be spoiled
    (``intact`` false: a streamed file is not where the exact model puts it, or the
    reader of ``out`` went away). Raises what the exact model raises for a bad layer.
    """
    writer = TarWriter(out)
    streamed: dict[str, tuple[int, int]] = {}
    above = _Shadow()
    reader_gone = False
    for index in reversed(range(len(arrivals.digests))):
        if reader_gone or arrivals.all_stored():
            # Nothing left to wait for: the model writes the rest, at a fraction of the cost
            # per entry of this pass (which pays for reading headers and checking names).
            break
        try:
            _stream_layer(arrivals, index, writer, above, streamed)
        except BrokenPipeError:
            reader_gone = True  # tar2sqfs stopped: the squash stage reports why
        above.add(read_members(LayerSource(arrivals.wait_stored(index), arrivals.digests[index])))
    # Built only now: building it beside the stream, as layers arrive, cost more in contention
    # for the interpreter lock than it saved (measured on 2 cores).
    tree = flatten_layers([LayerSource(arrivals.wait_stored(index), digest)
                           for index, digest in enumerate(arrivals.digests)], warn)
    intact = not reader_gone and all(tree.file_at(path) == where for path, where in streamed.items())
    if intact:
        try:
            with open(out, "wb", closefd=False) as stream:
                tree.write_tar(stream, written=streamed.keys())
        except BrokenPipeError:
            intact = False
    return StreamedImage(tree, len(streamed), intact)


def _stream_layer(arrivals: LayerArrivals, index: int, writer: TarWriter, above: _Shadow,
                  streamed: dict[str, tuple[int, int]]) -> None:
    """Write the regular files of layer ``index`` that no layer above hides, as their bytes arrive."""
    digest = arrivals.digests[index]
    window = ReadWindow(functools.partial(arrivals.read, index))
    for header in follow_headers(window):
        path = _streamable_path(header)
        if path is None or path in streamed or above.hides(path):
            continue
        what = f"layer {digest}: {path!r}"
        writer.write(file_header(path, header.mode, header.mtime, header.size))
        if header.size <= _SMALL_FILE:  # most likely in the window already, beside its header
            data = window(header.offset_data, header.size)
            if len(data) < header.size:
                raise data_cut_short(what)
            writer.write(data)
        else:
            _copy_arriving(arrivals, index, writer, header.offset_data, header.size, what)
        writer.pad(header.size)
        streamed[path] = (index, header.offset_data)
    writer.flush()


def _streamable_path(header: Header) -> str | None:
    """The path of a plain regular file under a plain name, else None (left to the model)."""
    if not header.isreg() or header.sparse is not None:
        return None
    parts = [part for part in header.name.split("/") if part not in ("", ".")]
    if not parts or any(part == ".." or part.startswith(WHITEOUT) for part in parts):
        return None
    return "/".join(parts)


def _copy_arriving(arrivals: LayerArrivals, index: int, writer: TarWriter, offset: int, size: int,
                   what: str) -> None:
    end = offset + size
    while offset < end:
        fd, available = arrivals.readable(index, offset, end)
        if available <= offset:
            raise data_cut_short(what)
        writer.copy(fd, offset, available - offset, what)
        offset = available


class _Shadow:
    """The paths that layers above the current one cover, by their names as written.

    A lower file is hidden if an upper layer has an entry at its path, deletes or replaces
    with a non-directory its path or a directory above it, or makes a directory above it
    opaque. Upper names that reach it through symbolic links are not seen here: the check
    against the exact model catches those.
    """

    def __init__(self) -> None:
        self._entries: set[str] = set()
        self._cut: set[str] = set()
        self._opaque: set[str] = set()

    def add(self, headers: list[Header]) -> None:
        """Add one layer (the highest not yet added)."""
        for header in headers:
            parts, _ = lexical_parts(header.name)
            if not parts:
                continue
            name, directory = parts[-1], "/".join(parts[:-1])
            if name == OPAQUE:
                self._opaque.add(directory)
            elif name.startswith(WHITEOUT):
                self._cut.add(_join(directory, name[len(WHITEOUT):]))
            else:
                for end in range(1, len(parts) + 1):
                    self._entries.add("/".join(parts[:end]))
                if not header.isdir():
                    self._cut.add("/".join(parts))

    def hides(self, path: str) -> bool:
        if path in self._entries or path in self._cut or "" in self._opaque:
            return True
        slash = path.find("/")
        while slash > 0:
            directory = path[:slash]
            if directory in self._cut or directory in self._opaque:
                return True
            slash = path.find("/", slash + 1)
        return False


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name
