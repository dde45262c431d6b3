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

import fcntl
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from imagegw.build.arrivals import LayerArrivals
from imagegw.build.flatten import (
    OPAQUE,
    WHITEOUT,
    ImageTree,
    LayerSource,
    count_entries,
    file_header,
    flatten_layers,
    lexical_parts,
    read_members,
)
from imagegw.build.tarscan import Header, ReadWindow, follow_headers
from imagegw.build.tarwrite import TarWriter, data_cut_short
from imagegw.config import Limits, limit_exceeded
from imagegw.errors import SquashError

_PIPE_SIZE = 1 << 20
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


class StreamedBuild:
    """One image built as its layers download: the layers arriving in the cache, and the tar
    stream the unpack stage writes from them while the squash stage compresses it."""

    def __init__(self, layer_digests: Sequence[str], limits: Limits = Limits()) -> None:
        self.arrivals = LayerArrivals(layer_digests)
        self.stream = ImageStream()
        self.limits = limits
        """What the layers' tars may hold (entries, header sizes, path depth)."""

    def downloads_ended(self, _outcome: object = None) -> None:
        """The pull stage ended, however: the unpack side stops waiting for layers that did not come."""
        self.arrivals.close("the pull stage ended without it")

    def write_image(self, warn: Callable[[str], None] | None = None) -> StreamedImage:
        """Flatten the layers into the stream as they arrive; the reading side learns how it ended."""
        try:
            image = flatten_top_down(self.arrivals, self.stream.writer, warn=warn, limits=self.limits)
        except BaseException as exc:
            self.stream.fail(exc)
            raise
        self.stream.finish(image)
        return image


@contextmanager
def streamed_build(layer_digests: Sequence[str], limits: Limits = Limits()) -> Iterator[StreamedBuild]:
    """A :class:`StreamedBuild` of the layers (base first) whose files and pipe are released however it ends;
    downloads still writing its layers then stop (see :meth:`LayerArrivals.release`)."""
    build = StreamedBuild(layer_digests, limits)
    try:
        yield build
    finally:
        build.arrivals.release()
        build.stream.close_reader()


def flatten_top_down(arrivals: LayerArrivals, out: int, warn: Callable[[str], None] | None = None,
                     limits: Limits = Limits()) -> StreamedImage:
    """Write the image of the layers in ``arrivals`` (base first) to the descriptor ``out`` as one tar.

    Returns once every layer is in and the stream is complete, or is known to be spoiled
    (``intact`` false: a streamed file is not where the exact model puts it, or the
    reader of ``out`` went away). Raises what the exact model raises for a bad layer, and
    LimitExceeded for layers past ``limits``.
    """
    writer = TarWriter(out)
    streamed: dict[str, tuple[int, int]] = {}
    above = _Shadow()
    entries_above = 0
    reader_gone = False
    for index in reversed(range(len(arrivals.digests))):
        if reader_gone or arrivals.all_stored():
            # Nothing left to wait for: the model writes the rest, at a fraction of the cost
            # per entry of this pass (which pays for reading headers and checking names).
            break
        try:
            _stream_layer(arrivals, index, writer, above, streamed, limits)
        except BrokenPipeError:
            reader_gone = True  # tar2sqfs stopped: the squash stage reports why
        layer = LayerSource(arrivals.wait_stored(index), arrivals.digests[index])
        members = read_members(layer, limits)
        # Counted here too: the shadow of the layers above grows with their entries, as the model does.
        entries_above = count_entries(entries_above, members, layer, limits)
        above.add(members)
    # Built only now: building it beside the stream, as layers arrive, cost more in contention
    # for the interpreter lock than it saved.
    tree = flatten_layers([LayerSource(arrivals.wait_stored(index), digest)
                           for index, digest in enumerate(arrivals.digests)], warn, limits)
    intact = not reader_gone and all(tree.file_at(path) == where for path, where in streamed.items())
    if intact:
        try:
            with open(out, "wb", closefd=False) as stream:
                tree.write_tar(stream, written=streamed.keys())
        except BrokenPipeError:
            intact = False
    return StreamedImage(tree, len(streamed), intact)


class ImageStream:
    """The pipe that the unpack stage writes the image's tar into while the squash stage compresses it.

    Beside the bytes, the writer hands over how the stream ended: a StreamedImage, or the
    exception that stopped it.
    """

    def __init__(self) -> None:
        self.reader, self.writer = os.pipe()
        widen_pipe(self.writer)
        self._closing = threading.Lock()
        """Two threads may close an end at once: only one may, or it could close a reused descriptor."""
        self._ending: Future[StreamedImage] = Future()

    def finish(self, image: StreamedImage) -> None:
        """The writer is done (``image.intact`` says whether the stream can be used)."""
        self._close_writer()
        self._ending.set_result(image)

    def fail(self, failure: BaseException) -> None:
        """The writer stopped with ``failure``; the stream must be thrown away."""
        self._close_writer()
        self._ending.set_exception(failure)

    def outcome(self) -> StreamedImage:
        """Wait for the writer; raise SquashError if it failed."""
        try:
            return self._ending.result()
        except BaseException as exc:  # the writer's failure, whatever it was
            raise SquashError(f"the image stream was abandoned: {exc or type(exc).__name__}") from None

    def close_reader(self) -> None:
        """The reading end is tar2sqfs's now (or nobody's)."""
        with self._closing:
            if self.reader >= 0:
                os.close(self.reader)
                self.reader = -1

    def _close_writer(self) -> None:
        with self._closing:
            if self.writer >= 0:
                os.close(self.writer)
                self.writer = -1


def _stream_layer(arrivals: LayerArrivals, index: int, writer: TarWriter, above: _Shadow,
                  streamed: dict[str, tuple[int, int]], limits: Limits) -> None:
    """Write the regular files of layer ``index`` that no layer above hides, as their bytes arrive."""
    digest = arrivals.digests[index]
    window = ReadWindow(functools.partial(arrivals.read, index))
    for header in follow_headers(window, limits.header_bytes):
        path = _streamable_path(header)
        if path is None or path in streamed or above.hides(path):
            continue
        if len(streamed) == limits.entries:  # every streamed file is an entry: bounds what this pass holds
            raise limit_exceeded(f"layer {digest} brings the image's tar entries past {limits.entries}", "maxEntries",
                                 limits.entries)
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


def widen_pipe(fd: int) -> None:
    """Give a pipe 1 MiB: at the default 64 KiB, writer and reader take turns sixteen times a megabyte."""
    with suppress(OSError):  # only an optimisation: a host that refuses keeps the default
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
