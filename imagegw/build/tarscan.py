"""A fast reader of tar headers, for the common formats layers use.

``tarfile`` builds a costly TarInfo for each entry; a layer holds up to 10^5 entries and
reading them was the largest Python cost of a pull. This reader handles ustar, GNU
long names and links, and PAX path/linkpath/size/mtime records. Anything else (GNU
sparse files, PAX global headers, base-256 numbers, a bad checksum, a damaged end) makes
it give up and return None, and the caller reads the layer with ``tarfile``, which
knows every corner and says what is wrong. What only bounds can stop (a header too large
to hold in memory, too many entries) it refuses itself, as ``tarfile`` would not.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from imagegw.config import Limits, limit_exceeded
from imagegw.errors import LimitExceeded

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_ZEROS_CHUNK = 1 << 20
_WINDOW = 64 << 10
_POSIX_MAGIC = b"ustar\x0000"
_GNU_LONGNAME, _GNU_LONGLINK, _PAX_LOCAL = b"L", b"K", b"x"
_EXTENDED_HEADERS = {_GNU_LONGNAME, _GNU_LONGLINK, _PAX_LOCAL, b"g", b"X"}
"""Entries whose data is header (names, PAX records: global, and Solaris' older type), held whole to be read."""
_NO_DATA_TYPES = {b"1", b"2", b"3", b"4", b"5", b"6"}  # links, devices, directories, FIFOs
_DIRTYPE, _REGTYPE, _AREGTYPE, _CONTTYPE = b"5", b"0", b"\0", b"7"
_KNOWN_TYPES = _NO_DATA_TYPES | {_REGTYPE, _AREGTYPE, _CONTTYPE}


class Header(NamedTuple):
    """One entry as tarfile would describe it (regular-file types folded into ``b"0"``)."""

    name: str
    type: bytes
    mode: int
    mtime: int
    size: int
    offset_data: int
    linkname: str
    sparse: tuple[tuple[int, int], ...] | None = None
    """A GNU sparse file's (offset, length) extents; only tarfile reads those."""

    def isreg(self) -> bool:
        return self.type == _REGTYPE

    def isdir(self) -> bool:
        return self.type == _DIRTYPE

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def isfifo(self) -> bool:
        return self.type == b"6"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"


class _Unsupported(Exception):
    """Something only tarfile handles."""


def scan_headers(path: Path, limits: Limits = Limits()) -> list[Header] | None:
    """Every entry of the tar at ``path``, or None if it needs ``tarfile`` to be read.

    A tar of more than ``limits.entries`` entries, or with a header larger than
    ``limits.header_bytes``, raises LimitExceeded (whose message the caller prefixes with the layer).
    """
    with open(path, "rb") as layer:
        size = os.fstat(layer.fileno()).st_size
        # pread, not mmap: mapping a gigabyte layer would count its pages in the process's
        # resident memory, and only the headers are wanted.
        window = ReadWindow(lambda offset, count, ahead: os.pread(layer.fileno(), count + ahead, offset))
        headers: list[Header] = []
        try:
            for header in _headers(window, size, limits.header_bytes):
                if len(headers) == limits.entries:
                    raise too_many_entries(limits)
                headers.append(header)
        except (_Unsupported, ValueError, IndexError):
            return None
        return headers


def too_many_entries(limits: Limits) -> LimitExceeded:
    """The refusal of one layer's tar holding more than ``limits.entries`` entries."""
    return limit_exceeded(f"more than {limits.entries} tar entries", "maxEntries", limits.entries)


def _header_too_large(offset: int, size: int, limit: int) -> LimitExceeded:
    """The refusal of an extended header (long name or link, PAX records) of ``size`` bytes at ``offset``."""
    return limit_exceeded(f"the tar header at byte {offset} is {size} bytes", "maxHeaderBytes", limit)


def bounded_tarinfo(max_header: int) -> type[tarfile.TarInfo]:
    """tarfile's member class, but refusing an extended header larger than ``max_header`` before
    reading it whole (tarfile itself would read a header of any size into memory)."""

    class Bounded(tarfile.TarInfo):
        def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type in _EXTENDED_HEADERS and self.size > max_header:
                raise _header_too_large(self.offset, self.size, max_header)
            member: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
            return member

    return Bounded


class ReadWindow:
    """Reads of a tar, served from a window read ahead of them where they fall inside it.

    A layer's headers and small files lie close together: read one by one, each would cost
    a system call (and, for a layer still arriving, a lock); through the window, a few
    dozen share one.
    """

    def __init__(self, read: Callable[[int, int, int], bytes], ahead: int = _WINDOW) -> None:
        """``read(offset, count, ahead)`` returns ``count`` bytes from ``offset`` (fewer only at the
        tar's end) and up to ``ahead`` more."""
        self._read = read
        self._ahead = ahead
        self._offset = 0
        self._data = b""

    def __call__(self, offset: int, count: int) -> bytes:
        start = offset - self._offset
        if 0 <= start and start + count <= len(self._data):
            return self._data[start:start + count]
        if count >= self._ahead:
            return self._read(offset, count, 0)
        self._data = self._read(offset, count, self._ahead - count)
        self._offset = offset
        return self._data[:count]


def follow_headers(read: Callable[[int, int], bytes], max_header: int) -> Iterator[Header]:
    """The entries of a tar that ``read(offset, count)`` returns bytes of, as far as this reader can go.

    ``read`` may wait for bytes still being written, and returns fewer only at the end. The
    entries stop at the tar's end, or quietly before anything only ``tarfile`` reads or any
    header larger than ``max_header`` (which ``scan_headers`` then refuses); the caller must
    not take a stop for the end of the layer.
    """
    try:
        yield from _headers(read, None, max_header)
    except (_Unsupported, ValueError, IndexError, LimitExceeded):
        return


def _headers(read: Callable[[int, int], bytes], size: int | None, max_header: int) -> Iterator[Header]:
    """The entries; with ``size`` None the tar's length is unknown, and what follows its end is not checked.
    An extended header larger than ``max_header`` raises LimitExceeded before it is read."""
    offset = 0
    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = read(offset, _BLOCK)
        if len(block) < _BLOCK:
            raise _Unsupported  # cut short: tarfile says how
        if block == _ZERO_BLOCK:
            if size is not None and not _only_zeros(read, offset, size):
                raise _Unsupported  # something after the end marker: tarfile reports it
            return
        _check_sum(block)
        kind = block[156:157]
        length = _number(block[124:136])
        if kind in _EXTENDED_HEADERS and length > max_header:
            # Refused here, not left to tarfile, which would read it whole into memory.
            raise _header_too_large(offset, length, max_header)
        data_offset = offset + _BLOCK
        next_offset = data_offset + -(-length // _BLOCK) * _BLOCK
        if size is not None and next_offset > size:
            raise _Unsupported
        if kind in (_GNU_LONGNAME, _GNU_LONGLINK):
            text = _text(read(data_offset, length))
            if kind == _GNU_LONGNAME:
                long_name = text
            else:
                long_link = text
            offset = next_offset
            continue
        if kind == _PAX_LOCAL:
            pax = _pax_records(read(data_offset, length))
            offset = next_offset
            continue
        if kind not in _KNOWN_TYPES:
            raise _Unsupported  # GNU sparse, PAX global headers, vendor types
        name = pax.get("path") or long_name or _name(block, kind)
        linkname = pax.get("linkpath") or long_link or _text(block[157:257])
        if "size" in pax:
            if not pax["size"].isdigit():
                raise _Unsupported
            length = int(pax["size"])
            next_offset = data_offset + -(-length // _BLOCK) * _BLOCK
        mtime = int(float(pax["mtime"])) if "mtime" in pax else _number(block[136:148])
        if kind == _AREGTYPE and name.endswith("/"):
            kind = _DIRTYPE  # old tars mark directories only by the slash
        if kind == _DIRTYPE:
            name = name.rstrip("/")
        if kind in (_AREGTYPE, _CONTTYPE):
            kind = _REGTYPE
        yield Header(name, kind, _number(block[100:108]), mtime, length, data_offset, linkname)
        offset = data_offset if kind in _NO_DATA_TYPES else next_offset
        long_name = long_link = None
        pax = {}


def _only_zeros(read: Callable[[int, int], bytes], start: int, end: int) -> bool:
    for chunk_start in range(start, end, _ZEROS_CHUNK):
        if read(chunk_start, min(end - chunk_start, _ZEROS_CHUNK)).strip(b"\0"):
            return False
    return True


def _check_sum(block: bytes) -> None:
    stored = _number(block[148:156])
    # The sum counts the checksum field itself as eight spaces.
    if stored != byte_sum(block) - byte_sum(block[148:156]) + 8 * 32:
        raise _Unsupported  # tarfile also accepts signed sums, and reports a bad one


def byte_sum(data: bytes | bytearray) -> int:
    """The sum of the bytes, as a tar checksum wants it."""
    # Headers are mostly NUL bytes, and deleting them runs in C: twice as fast as sum(data).
    return sum(data.translate(None, b"\0"))


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise _Unsupported  # base-256
    digits = field.split(b"\0", 1)[0].strip(b" ")
    return int(digits, 8) if digits else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _name(block: bytes, kind: bytes) -> str:
    name = _text(block[0:100])
    if block[257:265] == _POSIX_MAGIC:
        prefix = _text(block[345:500])
        if prefix:
            name = prefix + "/" + name
    return name


def _pax_records(body: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records; only the keys this reader understands are kept."""
    records: dict[str, str] = {}
    position = 0
    while position < len(body) and body[position:position + 1] != b"\0":
        space = body.index(b" ", position)
        length = int(body[position:space])
        if length <= 0:
            raise _Unsupported
        record = body[space + 1:position + length - 1]
        key, _, value = record.partition(b"=")
        text_key = key.decode("utf-8", "surrogateescape")
        if text_key in ("path", "linkpath", "size", "mtime"):
            records[text_key] = value.decode("utf-8", "surrogateescape")
        elif text_key.startswith("GNU.sparse") or text_key == "hdrcharset":
            raise _Unsupported
        position += length
    return records
