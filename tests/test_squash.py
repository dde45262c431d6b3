"""Squashfs building with the real tar2sqfs, read back with unsquashfs and rdsquashfs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

import imagegw.build.squash
from imagegw.build.arrivals import LayerArrivals
from imagegw.build.flatten import ImageTree, LayerSource, flatten_layers
from imagegw.build.squash import (
    SquashEntry,
    build_squashfs,
    build_squashfs_streamed,
    check_squashfs,
    list_squashfs,
)
from imagegw.build.stream import ImageStream, StreamedImage, flatten_top_down
from imagegw.config import Compression
from imagegw.errors import SquashError, StorageError

MTIME = 1_700_000_000


def write_layer(path: Path, members: list[tuple[str, bytes, dict]], owner: int = 1000) -> LayerSource:
    """A layer tar; each member is (name, tar type, attributes), a regular file's data in "data"."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, attributes in members:
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.uid, info.gid, info.uname = kind, MTIME, owner, owner, "user"
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


def test_an_output_that_cannot_be_created_raises_storage_error(tree: ImageTree, tmp_path: Path) -> None:
    output = tmp_path / "missing-dir" / "image.sqfs"
    with pytest.raises(StorageError, match=f"^{re.escape(str(output))}: No such file or directory"):
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


# The image every hand-made squashfs below is checked against.
IMAGE = [
    ("usr", tarfile.DIRTYPE, {}),
    ("usr/bin", tarfile.DIRTYPE, {}),
    ("usr/bin/x", tarfile.REGTYPE, {"mode": 0o755, "data": b"#!/bin/true\n"}),
    ("usr/lib", tarfile.DIRTYPE, {}),
    ("lib", tarfile.SYMTYPE, {"link": "usr/lib"}),
    ("run", tarfile.DIRTYPE, {}),
    ("run/pipe", tarfile.FIFOTYPE, {"mode": 0o644}),
]


def replaced(name: str, *members: tuple[str, bytes, dict]) -> list[tuple[str, bytes, dict]]:
    """IMAGE with the member ``name`` replaced by ``members`` (none: left out)."""
    at = [member[0] for member in IMAGE].index(name)
    return IMAGE[:at] + list(members) + IMAGE[at + 1:]


def hand_made_squashfs(tmp_path: Path, members: list[tuple[str, bytes, dict]], owner: int = 0) -> Path:
    """A squashfs that tar2sqfs makes of a tar of ``members``, not through build_squashfs."""
    tar = write_layer(tmp_path / "hand-made.tar", members, owner).path
    image = tmp_path / "hand-made.sqfs"
    with tar.open("rb") as stdin:
        subprocess.run(["tar2sqfs", "--quiet", "--no-skip", "--force", "--no-xattr", str(image)], stdin=stdin,
                       check=True)
    return image


def test_a_squashfs_that_holds_the_image_passes_the_check(tmp_path: Path) -> None:
    tree = flatten_layers([write_layer(tmp_path / "image.tar", IMAGE)])
    image = hand_made_squashfs(tmp_path, IMAGE)
    assert check_squashfs(image, tree).entries == tree.entries == 7


@pytest.mark.parametrize(("squashfs", "owner", "problem"), [
    (replaced("usr/bin/x"), 0,
     "'usr/bin/x' is a file of 12 bytes mode 0755 in the image, missing from the squashfs"),
    (replaced("usr/bin/x", ("usr/bin/x", tarfile.REGTYPE, {"mode": 0o644, "data": b"#!/bin/true\n"})), 0,
     "'usr/bin/x' has mode 0755 in the image, mode 0644 in the squashfs"),
    (replaced("usr/bin/x", ("usr/bin/x", tarfile.REGTYPE, {"mode": 0o755, "data": b"#!/bin/sh\n"})), 0,
     "'usr/bin/x' has 12 bytes in the image, 10 bytes in the squashfs"),
    (replaced("usr/bin/x", ("usr/bin/x", tarfile.DIRTYPE, {})), 0,
     "'usr/bin/x' is a file of 12 bytes mode 0755 in the image, a directory mode 0755 in the squashfs"),
    (replaced("lib", ("lib", tarfile.SYMTYPE, {"link": "usr/lib64"})), 0,
     "'lib' has target 'usr/lib' in the image, target 'usr/lib64' in the squashfs"),
    (replaced("run/pipe", ("run/pipe", tarfile.REGTYPE, {})), 0,
     "'run/pipe' is a FIFO mode 0644 in the image, a file of 0 bytes mode 0644 in the squashfs"),
    ([*IMAGE, ("stray", tarfile.REGTYPE, {"data": b"?"})], 0,
     "'stray' is a file of 1 bytes mode 0644 in the squashfs, not in the image"),
    (IMAGE, 1000, "'lib' has owner 0:0 in the image, owner 1000:1000 in the squashfs"),
], ids=["missing", "mode", "size", "type", "target", "fifo", "extra", "owner"])
def test_a_squashfs_that_differs_from_the_image_fails_the_check_naming_the_path(
        tmp_path: Path, squashfs: list[tuple[str, bytes, dict]], owner: int, problem: str) -> None:
    tree = flatten_layers([write_layer(tmp_path / "image.tar", IMAGE)])
    image = hand_made_squashfs(tmp_path, squashfs, owner)
    with pytest.raises(SquashError, match=f"^{re.escape(str(image))} does not hold the image: {re.escape(problem)}"):
        check_squashfs(image, tree)


def test_the_check_names_the_first_differences_and_counts_the_rest(tmp_path: Path) -> None:
    files = [(f"f{n}", tarfile.REGTYPE, {"data": b"x"}) for n in range(8)]
    tree = flatten_layers([write_layer(tmp_path / "image.tar", files)])
    image = hand_made_squashfs(tmp_path, files[6:])
    with pytest.raises(SquashError) as failure:
        check_squashfs(image, tree)
    assert str(failure.value) == (
        f"{image} does not hold the image: "
        + "; ".join(f"'f{n}' is a file of 1 bytes mode 0644 in the image, missing from the squashfs" for n in range(5))
        + "; and 1 more")


def test_a_full_disk_raises_storage_error_and_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    # small_disk (tests/disk_fixtures.py) is a 256 KiB tmpfs, mounted for the test.
    big = write_layer(tmp_path / "big.tar", [("big", tarfile.REGTYPE, {"data": os.urandom(1 << 20)})])
    tree = flatten_layers([big])
    output = small_disk / "image.squashfs"
    with pytest.raises(StorageError, match=f"^{re.escape(str(output))}: No space left on device"):
        build_squashfs(tree, output, Compression("gzip", 1), jobs=2)
    assert not output.exists() and list(small_disk.iterdir()) == []


def test_a_full_disk_stops_a_streamed_build_without_building_again(tmp_path: Path, small_disk: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # More than tar2sqfs's queue and the pipe hold, so that the writer sees tar2sqfs stop.
    files = [(f"big{n}", tarfile.REGTYPE, {"data": os.urandom(1 << 20)}) for n in range(24)]
    layer = write_layer(tmp_path / "big.tar", files)
    arrivals = LayerArrivals([layer.digest])
    arrivals.stored(layer.digest, layer.path)
    stream = ImageStream()
    written: list[StreamedImage] = []

    def write() -> None:
        written.append(flatten_top_down(arrivals, stream.writer))
        stream.finish(written[0])

    def build_again(*_: object) -> None:
        raise AssertionError("the image was built again on a full disk")

    monkeypatch.setattr(imagegw.build.squash, "build_squashfs", build_again)
    writer = threading.Thread(target=write)
    writer.start()
    output = small_disk / "image.squashfs"
    try:
        with pytest.raises(StorageError, match=f"^{re.escape(str(output))}: No space left on device"):
            build_squashfs_streamed(stream, output, Compression("gzip", 1), jobs=2)
    finally:
        writer.join()
        arrivals.release()
    assert not written[0].intact
    assert not output.exists() and list(small_disk.iterdir()) == []
