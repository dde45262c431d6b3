"""Squashfs building with the real tar2sqfs, read back with unsquashfs and rdsquashfs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagegw.config import Compression
from imagegw.errors import SquashError
from imagegw.build.flatten import ImageTree, LayerSource, flatten_layers
from imagegw.build.squash import SquashEntry, build_squashfs, list_squashfs

MTIME = 1_700_000_000


def write_layer(path: Path, members: list[tuple[str, bytes, dict]]) -> LayerSource:
    """A layer tar; each member is (name, tar type, attributes), a regular file's data in "data"."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, attributes in members:
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.uid, info.gid, info.uname = kind, MTIME, 1000, 1000, "user"
            info.mode = attributes.get("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
            info.linkname = attributes.get("link", "")
            data = attributes.get("data", b"")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return LayerSource(path, f"sha256:{path.stem}")


@pytest.fixture
def tree(tmp_path: Path) -> ImageTree:
    base = write_layer(tmp_path / "base.tar", [
        ("usr", tarfile.DIRTYPE, {}),
        ("usr/bin", tarfile.DIRTYPE, {}),
        ("usr/bin/tool", tarfile.REGTYPE, {"mode": 0o4750, "data": b"#!/bin/sh\necho hi\n"}),
        ("bin", tarfile.SYMTYPE, {"link": "/usr/bin"}),
        ("etc", tarfile.DIRTYPE, {}),
        ("etc/passwd", tarfile.REGTYPE, {"data": b"root:x:0:0::/root:/bin/sh\n"}),
        ("etc/old", tarfile.REGTYPE, {"data": b"old"}),
        ("tmp", tarfile.DIRTYPE, {"mode": 0o1777}),
        ("data", tarfile.REGTYPE, {"data": os.urandom(300_000)}),
    ])
    top = write_layer(tmp_path / "top.tar", [
        ("etc/.wh.old", tarfile.REGTYPE, {}),
        ("etc/hl", tarfile.LNKTYPE, {"link": "etc/passwd"}),
        ("run/pipe", tarfile.FIFOTYPE, {"mode": 0o600}),
        ("odd name -> with arrow", tarfile.SYMTYPE, {"link": "target -> too"}),
        ("new\nline", tarfile.REGTYPE, {"data": b"nl"}),
        ("bytes-\udcff", tarfile.REGTYPE, {"data": b"raw"}),
        ("short-link", tarfile.SYMTYPE, {"link": "x"}),
    ])
    return flatten_layers([base, top])


def rdsquashfs(image: Path, *args: str) -> bytes:
    return subprocess.run(["rdsquashfs", *args, str(image)], check=True, capture_output=True).stdout


def test_build_and_read_back(tree: ImageTree, tmp_path: Path) -> None:
    image = tmp_path / "image.sqfs"
    result = build_squashfs(tree, image, Compression("zstd", 3), jobs=2)
    assert result.path == image and result.size == image.stat().st_size and result.entries == tree.entries == 15
    listed = list_squashfs(image)
    assert listed == {
        "bin": SquashEntry("l", 0o777, 0, 0, 8, "/usr/bin"),
        "bytes-\udcff": SquashEntry("-", 0o644, 0, 0, 3, None),
        "data": SquashEntry("-", 0o644, 0, 0, 300_000, None),
        "short-link": SquashEntry("l", 0o777, 0, 0, 1, "x"),
        "etc": SquashEntry("d", 0o755, 0, 0, 0, None),
        "etc/hl": SquashEntry("-", 0o644, 0, 0, 26, None),
        "etc/passwd": SquashEntry("-", 0o644, 0, 0, 26, None),
        "new\nline": SquashEntry("-", 0o644, 0, 0, 2, None),
        "odd name -> with arrow": SquashEntry("l", 0o777, 0, 0, 13, "target -> too"),
        "run": SquashEntry("d", 0o755, 0, 0, 0, None),
        "run/pipe": SquashEntry("p", 0o644, 0, 0, 0, None),
        "tmp": SquashEntry("d", 0o1777, 0, 0, 0, None),
        "usr": SquashEntry("d", 0o755, 0, 0, 0, None),
        "usr/bin": SquashEntry("d", 0o755, 0, 0, 0, None),
        "usr/bin/tool": SquashEntry("-", 0o755, 0, 0, 18, None),
    }
    assert rdsquashfs(image, "-c", "/usr/bin/tool") == b"#!/bin/sh\necho hi\n"
    assert rdsquashfs(image, "-c", "/etc/hl") == b"root:x:0:0::/root:/bin/sh\n"
    assert len(rdsquashfs(image, "-c", "/data")) == 300_000
    hard_link, original = rdsquashfs(image, "-s", "/etc/hl").decode(), rdsquashfs(image, "-s", "/etc/passwd").decode()
    inode = re.compile(r"Inode number: (\d+)")
    assert inode.findall(hard_link) == inode.findall(original) != []
    assert "Hard link count: 2" in original
    assert "Access: 0755" in rdsquashfs(image, "-s", "/").decode()


def test_lz4_image_lists_like_the_others(tree: ImageTree, tmp_path: Path) -> None:
    # unsquashfs 4.5.1 cannot read tar2sqfs's lz4 images; list_squashfs reads them another way.
    build_squashfs(tree, tmp_path / "gzip.sqfs", Compression("gzip", 1))
    build_squashfs(tree, tmp_path / "lz4.sqfs", Compression("lz4", None))
    assert list_squashfs(tmp_path / "lz4.sqfs") == list_squashfs(tmp_path / "gzip.sqfs")
    assert rdsquashfs(tmp_path / "lz4.sqfs", "-c", "/etc/hl") == b"root:x:0:0::/root:/bin/sh\n"


def test_file_data_matches_layer(tmp_path: Path) -> None:
    content = os.urandom(1_000_000)
    layer = write_layer(tmp_path / "one.tar", [("blob", tarfile.REGTYPE, {"data": content})])
    image = tmp_path / "blob.sqfs"
    build_squashfs(flatten_layers([layer]), image, Compression("gzip", 1))
    assert rdsquashfs(image, "-c", "/blob") == content


@pytest.mark.parametrize("compression", [Compression("gzip", 1), Compression("gzip", None), Compression("xz", 0),
                                         Compression("zstd", 1), Compression("lz4", None)], ids=str)
def test_every_compressor_produces_a_listable_image(tree: ImageTree, tmp_path: Path,
                                                    compression: Compression) -> None:
    image = tmp_path / "image.sqfs"
    result = build_squashfs(tree, image, compression, block_size=65536)
    assert result.entries == len(list_squashfs(image)) == tree.entries
    superblock = subprocess.run(["unsquashfs", "-s", str(image)], check=True, capture_output=True, text=True).stdout
    assert f"Compression {compression.algorithm}" in superblock
    assert "Block size 65536" in superblock
    assert all(entry.uid == entry.gid == 0 for entry in list_squashfs(image).values())


def test_failing_tar2sqfs_raises_and_leaves_nothing(tree: ImageTree, tmp_path: Path) -> None:
    output = tmp_path / "missing-dir" / "image.sqfs"
    with pytest.raises(SquashError, match="tar2sqfs failed .*missing-dir"):
        build_squashfs(tree, output, Compression("gzip", 1))
    assert not output.exists()


def test_rejected_option_raises_and_removes_output(tree: ImageTree, tmp_path: Path) -> None:
    output = tmp_path / "image.sqfs"
    output.write_bytes(b"stale partial image")
    with pytest.raises(SquashError, match="tar2sqfs failed"):
        build_squashfs(tree, output, Compression("lz4", 5))
    assert not output.exists()


def test_timeout_kills_tar2sqfs_and_removes_output(tmp_path: Path) -> None:
    layer = write_layer(tmp_path / "big.tar", [("big", tarfile.REGTYPE, {"data": os.urandom(20_000_000)})])
    output = tmp_path / "image.sqfs"
    with pytest.raises(SquashError, match="did not finish within"):
        build_squashfs(flatten_layers([layer]), output, Compression("xz", 9), jobs=1, timeout=0.05)
    assert not output.exists()


@pytest.mark.parametrize(("content", "problem"), [
    (b"not a squashfs" * 100, "not a squashfs image"),
    (b"hsqs" + bytes(16) + b"\x01\x00" + b"damaged" * 100, "unsquashfs says"),
    (b"hsqs" + bytes(16) + b"\x05\x00" + b"damaged" * 100, "sqfs2tar says"),
])
def test_list_squashfs_of_a_damaged_image_raises(tmp_path: Path, content: bytes, problem: str) -> None:
    bogus = tmp_path / "bogus.sqfs"
    bogus.write_bytes(content)
    with pytest.raises(SquashError, match=f"cannot list .*bogus.sqfs: {problem}"):
        list_squashfs(bogus)
