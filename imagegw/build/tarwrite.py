"""Writing a tar stream: entry headers, and a buffered writer that moves file data by sendfile.

The headers carry only what an image needs (name, type, permission bits, mtime, size, link
target); owners are always root, and nothing else (users' names, xattrs) is written.
"""

from __future__ import annotations

import errno
import os
import tarfile
from typing import IO

from imagegw.build.tarscan import byte_sum
from imagegw.errors import LayerError

TAR_BLOCK = 512
"""A tar stream is made of blocks of this many bytes; two zero blocks end it."""

_BUFFER_LIMIT = 1 << 20
_SMALL_FILE = 64 << 10
"""Files up to this size are copied through the write buffer: one pread beats a flush plus a sendfile."""
_SENDFILE_CHUNK = 1 << 30


def encode_header(path: str, kind: bytes, mode: int, mtime: int, *, size: int = 0, linkname: str = "") -> bytes:
    """One entry's header: a plain ustar block when the entry fits one (nearly always), else PAX."""
    return _ustar(path, kind, mode, mtime, size, linkname) or _pax(path, kind, mode, mtime, size, linkname)


_USTAR_MAGIC = b"ustar\x0000"
_ZERO_ID = b"0000000\x00"
_MAX_OCTAL_11 = 8**11


def _ustar(path: str, kind: bytes, mode: int, mtime: int, size: int, linkname: str) -> bytes | None:
    # tarfile.TarInfo.tobuf is costly per entry and images have 10^5 entries, so common
    # headers are packed here directly. Anything unusual (non-ASCII or long names, huge
    # sizes, odd times) goes to the PAX path, whose output tar2sqfs reads the same way.
    if not (path.isascii() and linkname.isascii() and len(linkname) <= 100
            and 0 <= size < _MAX_OCTAL_11 and 0 <= mtime < _MAX_OCTAL_11):
        return None
    name, prefix = path.encode(), b""
    if len(name) > 100:
        cut = name.rfind(b"/", 0, 156)
        if cut <= 0 or len(name) - cut - 1 > 100:
            return None
        name, prefix = name[cut + 1:], name[:cut]
    block = bytearray(TAR_BLOCK)
    block[0:len(name)] = name
    block[100:108] = b"%07o\x00" % (mode & 0o7777)
    block[108:116] = _ZERO_ID
    block[116:124] = _ZERO_ID
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % mtime
    block[148:156] = b"        "
    block[156:157] = kind
    block[157:157 + len(linkname)] = linkname.encode()
    block[257:265] = _USTAR_MAGIC
    block[329:337] = _ZERO_ID
    block[337:345] = _ZERO_ID
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b"%06o\x00 " % byte_sum(block)
    return bytes(block)


def _pax(path: str, kind: bytes, mode: int, mtime: int, size: int, linkname: str) -> bytes:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.mtime, info.size, info.linkname = kind, mode, mtime, size, linkname
    # Layer names are not always UTF-8; surrogateescape gives back the original bytes.
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def data_cut_short(what: str) -> LayerError:
    """The error for a layer file that ends inside the data of the member ``what`` names."""
    return LayerError(f"{what}: the layer file ends inside its data")


class TarWriter:
    """Buffered writes to a file descriptor, with file data moved by sendfile where it can be."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._sendfile = True

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _BUFFER_LIMIT:
            self.flush()

    def flush(self) -> None:
        written = 0
        with memoryview(self._buffer) as view:
            while written < len(view):
                # A pipe may take only part of a write.
                written += os.write(self._fd, view[written:])
        self._buffer.clear()

    def copy(self, source: int, offset: int, size: int, what: str) -> None:
        """Write ``size`` bytes of ``source`` from ``offset``; ``what`` names them if the source ends early."""
        end = offset + size
        if size > _SMALL_FILE and self._sendfile:
            self.flush()
            offset = self._send(source, offset, end, what)
        while offset < end:
            data = os.pread(source, min(end - offset, _BUFFER_LIMIT), offset)
            if not data:
                raise data_cut_short(what)
            self.write(data)
            offset += len(data)

    def copy_stream(self, source: IO[bytes]) -> None:
        """Write what ``source`` reads, to its end."""
        while chunk := source.read(_BUFFER_LIMIT):
            self.write(chunk)

    def pad(self, size: int) -> None:
        """Fill the last block of ``size`` bytes of data."""
        self.write(bytes(-size % TAR_BLOCK))

    def end(self) -> None:
        """Write the blocks that end a tar stream, and flush."""
        self.write(bytes(2 * TAR_BLOCK))
        self.flush()

    def _send(self, source: int, offset: int, end: int, what: str) -> int:
        """Send ``source`` bytes from ``offset`` to ``end``; where it had to stop if sendfile cannot."""
        while offset < end:
            try:
                sent = os.sendfile(self._fd, source, offset, min(end - offset, _SENDFILE_CHUNK))
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                # Not every pair of descriptors supports sendfile; reading and writing always works.
                self._sendfile = False
                return offset
            if sent == 0:
                raise data_cut_short(what)
            offset += sent
        return offset
