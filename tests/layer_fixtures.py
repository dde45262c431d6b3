"""Layer tars written for a test: ``layer(f("etc/hosts", b"..."), d("usr"), ...)`` is a LayerSource."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from imagegw.build.flatten import LayerSource

MTIME = 1_700_000_000


def member(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", mode: int = 0o644,
           link: str = "", uid: int = 1000, pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, MTIME
    info.uid = info.gid = uid
    info.uname = info.gname = "someone"
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = pax
    return info, data


def d(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, mode=mode)


def f(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, data=data, mode=mode)


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.LNKTYPE, link=target)


class Layers:
    """Writes layer tars into a directory, numbering them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def __call__(self, *members: tuple[tarfile.TarInfo, bytes]) -> LayerSource:
        self.count += 1
        path = self.directory / f"layer{self.count}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in members:
                archive.addfile(info, io.BytesIO(data))
        return LayerSource(path, f"sha256:{self.count:064x}")


@pytest.fixture
def layer(tmp_path: Path) -> Layers:
    return Layers(tmp_path)
