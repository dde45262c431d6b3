"""The fast tar header reader gives what tarfile gives, or steps aside."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from imagegw.build.tarscan import Header, scan_headers
from imagegw.config import Limits
from imagegw.errors import LimitExceeded


def by_tarfile(path: Path) -> list[Header]:
    headers = []
    with tarfile.open(path) as archive:
        for info in archive:
            kind = tarfile.REGTYPE if info.isreg() else info.type
            headers.append(Header(info.name, kind, info.mode, int(info.mtime), info.size, info.offset_data,
                                  info.linkname))
    return headers


def archive(path: Path, tar_format: int, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tar_format) as out:
        for info, data in entries:
            out.addfile(info, io.BytesIO(data) if data else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", mode: int = 0o644,
          mtime: float = 1_700_000_000) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, mtime
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


VARIED = [
    entry("etc", tarfile.DIRTYPE, mode=0o755),
    entry("etc/hosts", data=b"127.0.0.1 localhost\n"),
    entry("bin/su", data=b"x" * 1000, mode=0o4755),
    entry("lib64", tarfile.SYMTYPE, link="usr/lib64"),
    entry("usr/bin/sh", tarfile.LNKTYPE, link="bin/su"),
    entry("run/fifo", tarfile.FIFOTYPE),
    entry("d" * 80 + "/" + "n" * 90, data=b"prefix field"),
    entry("long/" + "x" * 150, data=b"long name"),
    entry("link-long", tarfile.SYMTYPE, link="/" + "t" * 150),
    entry("caf\u00e9/men\u00fc", data=b"utf-8"),
    entry("empty", data=b""),
    entry("frac-time", data=b"t", mtime=1_700_000_000.75),
]


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_common_formats_read_the_same_as_tarfile(tmp_path: Path, tar_format: int) -> None:
    path = archive(tmp_path / "layer.tar", tar_format, VARIED)

    assert scan_headers(path) == by_tarfile(path)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_many_entries_across_read_windows_read_the_same_as_tarfile(tmp_path: Path, tar_format: int) -> None:
    # Headers, long-name records and data of every size fall across the reader's windows.
    entries = [entry(f"dir/{'n' * (n % 7 * 40)}{n}", data=bytes([n % 251]) * (n * 997 % 70_000))
               for n in range(300)]
    path = archive(tmp_path / "layer.tar", tar_format, entries)

    assert scan_headers(path) == by_tarfile(path)


def test_ustar_reads_the_same_as_tarfile(tmp_path: Path) -> None:
    fitting = [item for item in VARIED if item[0].name.isascii() and len(item[0].linkname) <= 100
               and "long/" not in item[0].name]
    path = archive(tmp_path / "layer.tar", tarfile.USTAR_FORMAT, fitting)

    assert scan_headers(path) == by_tarfile(path)


def test_unusual_archives_are_left_to_tarfile(tmp_path: Path) -> None:
    good = archive(tmp_path / "good.tar", tarfile.PAX_FORMAT, VARIED[:3]).read_bytes()
    damaged = bytearray(good)
    damaged[1536 + 148] ^= 0x01  # a checksum digit of a later header
    cases = {
        "truncated": good[:700],
        "bad-checksum": bytes(damaged),
        "garbage-after-end": good + b"trailing junk",
        "empty": b"",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(content)
        assert scan_headers(path) is None, name

    with tarfile.open(tmp_path / "global.tar", "w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as out:
        out.addfile(*entry("a", data=b"a")[:1], io.BytesIO(b"a"))
    assert scan_headers(tmp_path / "global.tar") is None


def test_hostile_extended_headers_are_left_to_tarfile_or_refused_when_too_large(tmp_path: Path) -> None:
    negative = tarfile.TarInfo("neg")
    with tarfile.open(tmp_path / "neg.tar", "w", format=tarfile.PAX_FORMAT) as out:
        negative.pax_headers = {"size": "-5"}
        out.addfile(negative)
    huge_name = "n/" * 600_000  # a 1.2 MB name
    with tarfile.open(tmp_path / "huge.tar", "w", format=tarfile.GNU_FORMAT) as out:
        out.addfile(tarfile.TarInfo(huge_name))

    assert scan_headers(tmp_path / "neg.tar") is None
    # tarfile would read it whole: refused, naming the limit that allows it.
    with pytest.raises(LimitExceeded, match=r"header at byte 0 is 1200001 bytes .*Limits.maxHeaderBytes, is 1048576"):
        scan_headers(tmp_path / "huge.tar")
    assert len(scan_headers(tmp_path / "huge.tar", Limits(header_bytes=2 << 20)) or []) == 1
