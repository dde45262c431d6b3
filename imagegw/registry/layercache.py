"""The layer cache: uncompressed layer tars keyed by their blob digest.

Layers are shared by all images and platforms, so a layer is downloaded once
however many pulls want it, even at the same moment in other threads or
processes (an ``flock`` per layer serialises them). A layer reaches its final
name only after its compressed digest, its size and, when known, its diff_id
have been checked; the cache never holds a partial or unverified layer.

A pull holds its layers (``holding``) while it runs, so eviction (``evict``, see
``imagegw.housekeeping``) passes them by; each use makes a layer the most recently
used: its tar's mtime says when it was last wanted.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

import zstandard

try:
    # ISA-L inflates gzip much faster than zlib; it has wheels for x86_64 and aarch64 only,
    # so other hosts fall back to zlib.
    from isal import isal_zlib as _inflate
except ImportError:
    _inflate = zlib  # type: ignore[misc]

from imagegw.build import LayerArrivals
from imagegw.config import limit_exceeded
from imagegw.disk import disk_errors, fsync_directory, start_writeback
from imagegw.errors import DigestMismatch, LayerError
from imagegw.registry.client import LayerDescriptor, RegistryClient, ResolvedImage

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_LAYER_NAME = re.compile(r"([0-9a-f]{64})\.tar")
_PARTIAL_NAME = re.compile(r"\.([0-9a-f]{64})\..+\.partial")
# Two lock files per layer, under <root>/locks. A download takes the first exclusively; pulls share
# the second while they use the layer, and eviction needs it exclusively. They must be two files:
# flock binds to the open file, so one process downloading a layer it also holds would lock itself out.
_DOWNLOAD_LOCK = ".lock"
_USE_LOCK = ".use"
_CHUNK = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# zlib's automatic header detection (32) over the largest window (15): accepts gzip and zlib streams.
_GZIP_WBITS = 32 + 15
# Decompression output per call is bounded so a hostile layer (a few KiB that inflate to
# gigabytes) cannot exhaust memory. zlib takes a limit; zstd does not, but its 128 KiB blocks
# cap its ratio near 32768:1, so 256-byte slices of input yield at most 8 MiB. 256 bytes is the
# smallest slice that costs no speed: smaller ones slow zstd down, larger ones are no faster.
_MAX_OUTPUT = 4 * 1024 * 1024
_WRITEBACK_STEP = 32 * 1024 * 1024
_ZSTD_SLICE = 256
# isal's stub declares ``error`` an Exception instance; it is the class of isal's errors.
_INFLATE_ERROR = cast("type[Exception]", _inflate.error)


@dataclass(frozen=True)
class CachedLayer:
    """A layer tar in the cache."""

    digest: str
    size: int
    used: float
    """When a pull last wanted it (the tar's mtime)."""


@dataclass(frozen=True)
class ImageBytesLimit:
    """How many bytes an image's layers may hold uncompressed: ``Limits.maxImageBytes``, or (``free_in``
    set) what the platform's image directory ``free_in`` had free when the pull started."""

    bytes: int
    free_in: str | None = None


class _ImageBytes:
    """The uncompressed bytes of one image's layers, counted by all its downloads as they decompress.

    Counting as the bytes stream, not after a layer is complete, is what stops a compression bomb
    (a few megabytes inflating to terabytes) at the limit instead of at a full disk.
    """

    def __init__(self, image: str, limit: ImageBytesLimit) -> None:
        self._image = image
        self._limit = limit
        self._total = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        """Count ``count`` more bytes; LimitExceeded once they pass the limit (they must not be written)."""
        with self._lock:
            self._total += count
            total = self._total
        if total > self._limit.bytes:
            free = f", more than {self._limit.free_in} had free" if self._limit.free_in else ""
            raise limit_exceeded(f"{self._image}: its layers hold more than {self._limit.bytes} bytes uncompressed"
                                 f"{free}", "maxImageBytes", self._limit.bytes)


class LayerCache:
    """Uncompressed layer tars under ``<root>/layers/sha256/<hex>.tar``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config_dir(self) -> Path:
        """Where image configs are kept by digest (see RegistryClient's ``config_cache``)."""
        return self.root / "configs" / "sha256"

    def path(self, digest: str) -> Path:
        """Where the uncompressed tar of the layer with blob ``digest`` lives (or will)."""
        return self._layer_dir / f"{_hex(digest)}.tar"

    def has(self, digest: str) -> bool:
        """Whether the layer is cached (complete and verified: nothing else gets its name)."""
        return self.path(digest).is_file()

    @contextlib.contextmanager
    def holding(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep the layers ``digests`` from eviction while the block runs, and mark the cached ones used.

        Pulls share a layer's use lock, so any number of them hold it at once; eviction needs it
        exclusively. A layer being evicted at this moment is waited for, then fetched anew.
        """
        with contextlib.ExitStack() as held:
            with disk_errors(self._lock_dir, "holding the layers of a pull"):
                for digest in dict.fromkeys(digests):
                    fd = self._open_lock(digest, _USE_LOCK)
                    held.callback(os.close, fd)
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    _mark_used(self.path(digest))
            yield

    def layers(self) -> list[CachedLayer]:
        """Every layer in the cache, least recently used first."""
        if not self._layer_dir.is_dir():
            return []
        found = []
        with os.scandir(self._layer_dir) as entries:
            for entry in entries:
                name = _LAYER_NAME.fullmatch(entry.name)
                if name is None:
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # evicted by another sweep meanwhile
                    continue
                found.append(CachedLayer(f"sha256:{name.group(1)}", stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda layer: layer.used)

    def evict(self, digest: str) -> int | None:
        """Delete a cached layer: the bytes freed (0: it was gone), or None when a pull holds it or
        downloads it, which keeps it."""
        with self._lock_if_free(digest, _USE_LOCK) as unused, self._lock_if_free(digest, _DOWNLOAD_LOCK) as idle:
            if not (unused and idle):
                return None
            return _remove(self.path(digest))

    def partials(self) -> list[Path]:
        """The partial downloads in the cache: live downloads', and those of processes that died."""
        return sorted(path for path in self._layer_dir.glob(".*.partial") if _PARTIAL_NAME.fullmatch(path.name))

    def remove_partial(self, partial: Path) -> int | None:
        """Delete a partial download: the bytes freed, or None when its layer is being downloaded."""
        name = _PARTIAL_NAME.fullmatch(partial.name)
        if name is None:
            raise LayerError(f"{partial} is not a partial download of the layer cache")
        with self._lock_if_free(f"sha256:{name.group(1)}", _DOWNLOAD_LOCK) as idle:
            return _remove(partial) if idle else None

    @property
    def _layer_dir(self) -> Path:
        return self.root / "layers" / "sha256"

    @property
    def _lock_dir(self) -> Path:
        return self.root / "locks"

    def fetch(self, client: RegistryClient, repository: str, layer: LayerDescriptor, diff_id: str | None = None,
              progress: Callable[[int], None] | None = None, arrivals: LayerArrivals | None = None,
              count: Callable[[int], None] | None = None) -> Path:
        """The cached tar of ``layer``, downloaded and verified first if needed.

        ``progress`` gets the number of newly downloaded (compressed) bytes after each chunk;
        ``arrivals`` hears of the partial file as it grows and of the layer once stored;
        ``count`` of the uncompressed bytes, before each write (a cached layer's all at once),
        and may raise to stop the download.
        """
        final = self._fetch(client, repository, layer, diff_id, progress, arrivals, count)
        if arrivals is not None:
            arrivals.stored(layer.digest, final)
        return final

    def _fetch(self, client: RegistryClient, repository: str, layer: LayerDescriptor, diff_id: str | None,
               progress: Callable[[int], None] | None, arrivals: LayerArrivals | None,
               count: Callable[[int], None] | None) -> Path:
        final = self.path(layer.digest)
        if _mark_used(final):
            return _counted(final, count)
        # An OSError here is the cache's own files failing (a full disk, say): the registry
        # client turns every network failure into a RegistryError, none of them an OSError.
        doing = f"storing layer {layer.digest} of {client.location.host}/{repository}"
        with disk_errors(final.parent, doing), self._locked(layer.digest):
            # Whoever held the lock before us may have just finished this very layer.
            if final.is_file():
                return _counted(final, count)
            self._remove_stale_partials(final)
            self._download(client, repository, layer, diff_id, progress, arrivals, count, final)
        return final

    @contextlib.contextmanager
    def _locked(self, digest: str) -> Iterator[None]:
        fd = self._open_lock(digest, _DOWNLOAD_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _lock_if_free(self, digest: str, kind: str) -> Iterator[bool]:
        """Hold the layer's ``kind`` lock exclusively for the block if nobody else holds it; say whether."""
        fd = self._open_lock(digest, kind)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def _open_lock(self, digest: str, kind: str) -> int:
        # flock (unlike lockf) binds to the open file, so it excludes other threads of this
        # process as well as other processes. Lock files stay: deleting one would let a
        # newcomer lock a fresh file while a waiter still holds the old one.
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        return os.open(self._lock_dir / f"{_hex(digest)}{kind}", os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _remove_stale_partials(final: Path) -> None:
        # We hold the layer's lock, so any partial file of it belongs to a process that died.
        for stale in final.parent.glob(f".{final.stem}.*.partial"):
            stale.unlink(missing_ok=True)

    @staticmethod
    def _download(client: RegistryClient, repository: str, layer: LayerDescriptor, diff_id: str | None,
                  progress: Callable[[int], None] | None, arrivals: LayerArrivals | None,
                  count: Callable[[int], None] | None, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".partial", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                written = None
                if arrivals is not None:
                    arrivals.writing(layer.digest, Path(partial))
                    written = functools.partial(arrivals.written, layer.digest)
                _transfer(client, repository, layer, diff_id, progress, out, written, count)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        fsync_directory(final.parent)


def fetch_layers(client: RegistryClient, image: ResolvedImage, cache: LayerCache, *, parallel: int = 3,
                 progress: Callable[[str, int], None] | None = None,
                 prepare: Callable[[LayerDescriptor, Path], None] | None = None,
                 arrivals: LayerArrivals | None = None, limit: ImageBytesLimit | None = None) -> list[Path]:
    """The cached tars of all of ``image``'s layers, in layer order; missing ones fetched in parallel.

    The largest layer starts first, as it is the critical path; the others follow from the top
    down, the order in which a flattener reading ``arrivals`` needs them.
    ``progress(digest, new_bytes)`` is called from the download threads. ``prepare(layer, path)``
    runs in the download thread once a layer is in the cache, so per-layer work (reading its
    tar headers) overlaps the other downloads. On the first failure the other downloads are
    abandoned and that failure is raised. ``limit`` bounds the layers' uncompressed bytes together
    (LimitExceeded), counted as they decompress.
    """
    wanted = dict(zip((layer.digest for layer in image.layers), zip(image.layers, image.diff_ids, strict=True)))
    if not wanted:
        return []
    failed = threading.Event()
    count = _ImageBytes(str(image.ref), limit).add if limit is not None else None

    def fetch_one(layer: LayerDescriptor, diff_id: str) -> Path:
        def report(new_bytes: int) -> None:
            # Raising here aborts this download (its partial file is removed) once another failed.
            if failed.is_set():
                raise _Abandoned()
            if progress:
                progress(layer.digest, new_bytes)
        path = cache.fetch(client, image.ref.repository, layer, diff_id, report, arrivals, count)
        if prepare:
            prepare(layer, path)
        return path

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(wanted))), thread_name_prefix="layer") as pool:
        top_down = list(reversed(wanted.items()))
        largest = max(top_down, key=lambda item: item[1][0].size)
        top_down.remove(largest)
        futures = {digest: pool.submit(fetch_one, *job) for digest, job in [largest, *top_down]}
        wait(futures.values(), return_when=FIRST_EXCEPTION)
        error = _first_error(futures.values())
        if error is not None:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise error
    return [futures[layer.digest].result() for layer in image.layers]


class _Abandoned(Exception):
    """A download stopped because another layer of the same pull failed."""


def _first_error(futures: Iterable[Future[Path]]) -> BaseException | None:
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            return future.exception()
    return None


def _transfer(client: RegistryClient, repository: str, layer: LayerDescriptor, diff_id: str | None,
              progress: Callable[[int], None] | None, out: BinaryIO,
              written: Callable[[int], None] | None = None, count: Callable[[int], None] | None = None) -> None:
    """Stream the blob into ``out`` decompressed, then check size, digest and diff_id.

    ``written`` is told how many bytes ``out`` holds after each write; ``count`` of each piece of
    uncompressed bytes before it is written.
    """
    subject = f"layer {layer.digest} of {client.location.host}/{repository}"
    compressed = hashlib.sha256()
    received = 0
    decoder = _LayerDecoder(out, written, count)
    try:
        with client.blob_chunks(repository, layer.digest, _CHUNK) as chunks:
            for chunk in chunks:
                received += len(chunk)
                if received > layer.size:
                    raise DigestMismatch(
                        f"{subject}: registry sent more than the {layer.size} bytes the manifest declares"
                    )
                compressed.update(chunk)
                decoder.feed(chunk)
                if progress:
                    progress(len(chunk))
        decoder.finish()
    except BaseException:
        decoder.abandon()
        raise
    if received != layer.size:
        raise DigestMismatch(f"{subject}: registry sent {received} bytes, the manifest declares {layer.size}")
    if "sha256:" + compressed.hexdigest() != layer.digest:
        raise DigestMismatch(
            f"{subject}: downloaded bytes have digest sha256:{compressed.hexdigest()}, expected {layer.digest}"
        )
    # Only now: a decoding failure of bytes that are not the layer is a download problem, reported above.
    if decoder.error is not None:
        raise LayerError(f"{subject} is corrupt: {decoder.error}")
    if diff_id is not None and decoder.digest != diff_id:
        raise DigestMismatch(f"{subject}: uncompressed content has digest {decoder.digest}, expected diff_id {diff_id}")


class _Codec(Protocol):
    def feed(self, data: bytes, emit: Callable[[bytes], None]) -> None: ...

    def finish(self, emit: Callable[[bytes], None]) -> None: ...


class _LayerDecoder:
    """Writes a layer's tar bytes to ``out`` and hashes them, whatever the blob's compression.

    The compression is told by magic bytes, not the media type, which registries and
    pushers get wrong. A decoding error is recorded, not raised, so the caller can first
    tell whether the downloaded bytes are the layer at all.
    """

    def __init__(self, out: BinaryIO, written: Callable[[int], None] | None = None,
                 count: Callable[[int], None] | None = None) -> None:
        self._sink = _HashingWriter(out, written)
        self._count = count
        self._head = b""
        self._codec: _Codec | None = None
        self.error: str | None = None

    @property
    def digest(self) -> str:
        """sha256 of the uncompressed bytes: the layer's diff_id (once ``finish`` returned)."""
        return self._sink.digest

    def feed(self, data: bytes) -> None:
        if self._codec is None:
            self._head += data
            if len(self._head) < len(_ZSTD_MAGIC):
                return
            data = self._choose_codec()
        self._decode(data)

    def finish(self) -> None:
        try:
            if self._codec is None:  # the whole blob is shorter than the zstd magic
                self._decode(self._choose_codec())
            self._decode(None)
        finally:
            self._sink.close()

    def abandon(self) -> None:
        """Stop the writer thread after a failed download (what it wrote is thrown away)."""
        with contextlib.suppress(BaseException):
            self._sink.close()

    def _choose_codec(self) -> bytes:
        """Pick the codec from the bytes held back so far, and hand those bytes over."""
        self._codec = _codec_for(self._head)
        head, self._head = self._head, b""
        return head

    def _decode(self, data: bytes | None) -> None:
        """Feed ``data`` to the codec (None: the stream ended); remember the first decoding error."""
        if self.error is not None or self._codec is None:
            return
        try:
            if data is None:
                self._codec.finish(self._emit)
            else:
                self._codec.feed(data, self._emit)
        except (zlib.error, _INFLATE_ERROR, zstandard.ZstdError, _Truncated) as exc:
            self.error = str(exc)

    def _emit(self, data: bytes) -> None:
        if self._count is not None:
            self._count(len(data))  # raises past the image's limit: the bytes are never written
        self._sink.write(data)


class _HashingWriter:
    """Hashes and writes decompressed bytes in a thread of its own.

    Inflating, hashing and writing a large layer one after another keeps one core busy with
    all three; with hashing and writing beside the inflating, two cores share the work. At most
    _QUEUED_BYTES wait in memory (more only when a single chunk is larger).
    """

    _QUEUED_BYTES = 8 * 1024 * 1024

    def __init__(self, out: BinaryIO, written: Callable[[int], None] | None = None) -> None:
        self._out = out
        self._written = written
        self._size = 0
        self._flushed = 0
        """Bytes already handed to the kernel's writeback (see imagegw.disk)."""
        self._hash = hashlib.sha256()
        self._chunks: collections.deque[bytes | None] = collections.deque()
        self._queued = 0
        self._changed = threading.Condition()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="layer writer", daemon=True)
        self._thread.start()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def write(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        if data:
            self._put(data)

    def close(self) -> None:
        """Wait until everything queued is written; raise what writing failed with."""
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()
        if self._failure is not None:
            raise self._failure

    def _put(self, data: bytes | None) -> None:
        size = len(data) if data else 0
        with self._changed:
            self._changed.wait_for(lambda: not self._chunks or self._queued + size <= self._QUEUED_BYTES)
            self._chunks.append(data)
            self._queued += size
            self._changed.notify_all()
            if size > self._QUEUED_BYTES // 2:
                # A chunk this big (only a highly compressed zstd layer makes them) would have the
                # next one made beside it while it waits to be queued: let this one be written first.
                self._changed.wait_for(lambda: self._queued <= self._QUEUED_BYTES // 2)

    def _drain(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._chunks))
                data = self._chunks[0]
            if data is None:
                return
            if self._failure is None:
                try:
                    self._hash.update(data)
                    self._out.write(data)
                    self._size += len(data)
                    if self._written is not None:
                        self._out.flush()  # readers of the partial file are told of bytes in it, not in a buffer
                        self._written(self._size)
                    if self._size - self._flushed >= _WRITEBACK_STEP:
                        self._out.flush()
                        start_writeback(self._out.fileno(), self._flushed, self._size - self._flushed)
                        self._flushed = self._size
                except BaseException as exc:  # handed to the producer thread
                    self._failure = exc
            with self._changed:
                self._chunks.popleft()
                self._queued -= len(data)
                self._changed.notify_all()


class _Truncated(Exception):
    """The compressed stream stopped inside a gzip member or zstd frame."""


def _codec_for(head: bytes) -> _Codec:
    if head.startswith(_GZIP_MAGIC):
        return _Gzip()
    if head.startswith(_ZSTD_MAGIC):
        return _Zstd()
    return _Plain()


class _Plain:
    def feed(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        emit(data)

    def finish(self, emit: Callable[[bytes], None]) -> None:
        pass


class _Gzip:
    """gzip, including concatenated members (pigz and some pushers write several)."""

    def __init__(self) -> None:
        self._inflater = _inflate.decompressobj(_GZIP_WBITS)

    def feed(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        while data:
            if self._inflater.eof:
                self._inflater = _inflate.decompressobj(_GZIP_WBITS)
            emit(self._inflater.decompress(data, _MAX_OUTPUT))
            data = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail

    def finish(self, emit: Callable[[bytes], None]) -> None:
        emit(self._inflater.flush())
        if not self._inflater.eof:
            raise _Truncated("gzip data ends in the middle of a member")


class _Zstd:
    """zstd, including several frames one after another."""

    def __init__(self) -> None:
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()

    def feed(self, data: bytes, emit: Callable[[bytes], None]) -> None:
        for start in range(0, len(data), _ZSTD_SLICE):
            piece = data[start:start + _ZSTD_SLICE]
            while piece:
                if self._frame.eof:
                    self._frame = self._decompressor.decompressobj()
                emit(self._frame.decompress(piece))
                piece = self._frame.unused_data if self._frame.eof else b""

    def finish(self, emit: Callable[[bytes], None]) -> None:
        if not self._frame.eof:
            raise _Truncated("zstd data ends in the middle of a frame")


def _counted(path: Path, count: Callable[[int], None] | None) -> Path:
    """A cached layer's ``path``, its size first told to ``count``."""
    if count is not None:
        count(path.stat().st_size)
    return path


def _mark_used(path: Path) -> bool:
    """Make a cached layer the most recently used; False if it is not in the cache."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _remove(path: Path) -> int:
    """Delete ``path``; the bytes that frees (0 if it was already gone)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _hex(digest: str) -> str:
    match = _DIGEST.fullmatch(digest)
    if not match:
        raise LayerError(f"layer digest {digest!r} is not a sha256 digest")
    return match.group(1)
