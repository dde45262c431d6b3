"""The top-down flattener: the image it streams while layers arrive equals the exact model's."""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from imagegw.build.arrivals import LayerArrivals
from imagegw.build.flatten import LayerSource, flatten_layers
from imagegw.build.squash import ImageStream, build_squashfs_streamed
from imagegw.build.stream import StreamedImage, flatten_top_down
from imagegw.config import Compression
from imagegw.errors import LayerError
from tests.layer_fixtures import Layers, d, f, hard, sym
from tests.squashfs_reader import read_tree


def stored(*layers: LayerSource) -> LayerArrivals:
    """Arrivals of layers that are all in the cache already."""
    arrivals = LayerArrivals([source.digest for source in layers])
    for source in layers:
        arrivals.stored(source.digest, source.path)
    return arrivals


def arriving(*layers: LayerSource) -> LayerArrivals:
    """Arrivals where the base layer's bytes are all written but it is stored only a while later,
    so that the flattener streams every layer."""
    base, *rest = layers
    arrivals = LayerArrivals([source.digest for source in layers])
    for source in rest:
        arrivals.stored(source.digest, source.path)
    arrivals.writing(base.digest, base.path)
    arrivals.written(base.digest, base.path.stat().st_size)
    threading.Timer(0.3, arrivals.stored, [base.digest, base.path]).start()
    return arrivals


def run(arrivals: LayerArrivals, out: Path) -> StreamedImage:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return flatten_top_down(arrivals, fd)
    finally:
        os.close(fd)
        arrivals.release()


def contents(tar: Path) -> dict[str, tuple]:
    """Every path's type, mode and content (a hard link's is its target's), whatever the order."""
    found: dict[str, tuple] = {}
    with tarfile.open(tar) as archive:
        members = archive.getmembers()
        for info in members:
            if info.islnk():
                continue
            data = archive.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            found[info.name.rstrip("/") or "."] = (info.type, info.mode, info.linkname if info.issym() else None,
                                                    hashlib.sha256(data).hexdigest() if data is not None else None)
        for info in members:
            if info.islnk():
                found[info.name] = found[info.linkname]
    return found


def classic(tmp_path: Path, *layers: LayerSource) -> dict[str, tuple]:
    out = tmp_path / "classic.tar"
    with out.open("wb") as stream:
        flatten_layers(layers).write_tar(stream)
    return contents(out)


def test_streamed_image_equals_the_exact_model(layer: Layers, tmp_path: Path) -> None:
    base = layer(d("etc"), f("etc/passwd", b"root"), f("etc/old", b"old"), d("usr"), f("usr/big", os.urandom(200_000)),
                 d("doc"), f("doc/a", b"a"), f("doc/b", b"b"), f("gone", b"x"), f("replaced", b"lower"),
                 f("setuid", b"s", mode=0o4755))
    middle = layer(f("etc/passwd", b"root\nuser"), hard("etc/passwd-link", "etc/passwd"), f(".wh.gone"),
                   d("doc"), f("doc/.wh..wh..opq"), f("doc/c", b"c"), sym("replaced", "etc/passwd"))
    top = layer(f("etc/.wh.old"), f("new", b"new"), hard("usr/big-link", "usr/big"), d("etc", mode=0o1750))
    expected = classic(tmp_path, base, middle, top)

    image = run(arriving(base, middle, top), tmp_path / "streamed.tar")

    assert image.intact and image.streamed_files == 5  # new; etc/passwd, doc/c; usr/big, setuid
    assert contents(tmp_path / "streamed.tar") == expected
    assert expected["etc"][1] == 0o1755 and "doc/a" not in expected and "gone" not in expected


def test_a_layer_listed_twice_in_an_image_is_streamed_once(layer: Layers, tmp_path: Path) -> None:
    base = layer(f("base", b"b"))
    repeated = layer(f("shared", b"s"), f("big", os.urandom(100_000)))
    middle = layer(f(".wh.big"), f("mid", b"m"))
    layers = (base, repeated, middle, repeated)
    expected = classic(tmp_path, *layers)

    image = run(arriving(*layers), tmp_path / "streamed.tar")

    assert image.intact and image.streamed_files == 4  # shared and big of the top copy, mid, base
    assert contents(tmp_path / "streamed.tar") == expected and "big" in expected


@pytest.mark.parametrize("name, lower, upper", [
    # the upper file reaches its place through a symlink of a lower layer
    ("symlinked parent", [d("usr"), d("usr/lib"), sym("lib", "usr/lib")], [f("lib/x.so", b"elf")]),
    # a name that comes twice in one layer: the second wins
    ("repeated name", [f("other")], [f("twice", b"first"), f("twice", b"second")]),
])
def test_a_stream_the_model_contradicts_is_spoiled(layer: Layers, tmp_path: Path, name: str, lower: list,
                                                     upper: list) -> None:
    layers = (layer(*lower), layer(*upper))
    image = run(arriving(*layers), tmp_path / "streamed.tar")
    assert not image.intact
    assert image.tree.paths() == flatten_layers(layers).paths()


def test_a_spoiled_stream_is_rebuilt_from_the_model_by_the_squash_stage(layer: Layers, tmp_path: Path) -> None:
    layers = (layer(d("usr"), d("usr/lib"), sym("lib", "usr/lib")), layer(f("lib/x.so", b"elf"), f("y", b"y")))
    arrivals, stream = arriving(*layers), ImageStream()
    writer = threading.Thread(target=lambda: stream.finish(flatten_top_down(arrivals, stream.writer)))
    writer.start()
    result = build_squashfs_streamed(stream, tmp_path / "image.sqfs", Compression("gzip", 1))
    writer.join()

    tree = read_tree(result.path)
    assert tree["usr/lib/x.so"].data == b"elf" and "lib/x.so" not in tree and tree["lib"].target == "usr/lib"


def test_layers_all_in_the_cache_are_written_from_the_model_alone(layer: Layers, tmp_path: Path) -> None:
    layers = (layer(d("etc"), f("etc/a", b"a"), f("b", os.urandom(100_000))), layer(f("etc/.wh.a"), f("c", b"c")))
    image = run(stored(*layers), tmp_path / "streamed.tar")
    with (tmp_path / "classic.tar").open("wb") as classic_tar:
        flatten_layers(layers).write_tar(classic_tar)
    assert image.intact and image.streamed_files == 0
    assert (tmp_path / "streamed.tar").read_bytes() == (tmp_path / "classic.tar").read_bytes()


def test_layers_are_streamed_while_they_arrive(layer: Layers, tmp_path: Path) -> None:
    top = layer(f("top", b"t"))
    # Small files are read from a window ahead of the headers, large ones as they arrive; bytes
    # come in pieces that end anywhere, inside headers and data alike.
    sizes = [0, 1, 511, 512, 513, 4_000, 16_384, 16_385, 50_000, 70_000] * 4
    big = layer(*[f(f"file{n}", os.urandom(size)) for n, size in enumerate(sizes)])
    expected = classic(tmp_path, big, top)
    arrivals = LayerArrivals([big.digest, top.digest])
    arrivals.stored(top.digest, top.path)
    partial = tmp_path / "big.partial"
    seen_before_stored: list[int] = []

    def download() -> None:
        data = big.path.read_bytes()
        with partial.open("wb", buffering=0) as out:
            arrivals.writing(big.digest, partial)
            for start in range(0, len(data), 7_777):
                out.write(data[start:start + 7_777])
                arrivals.written(big.digest, min(len(data), start + 7_777))
                time.sleep(0.0005)
        seen_before_stored.append((tmp_path / "streamed.tar").stat().st_size)
        final = tmp_path / "big.tar"
        partial.rename(final)
        arrivals.stored(big.digest, final)

    downloader = threading.Thread(target=download)
    downloader.start()
    image = run(arrivals, tmp_path / "streamed.tar")
    downloader.join()

    assert image.intact and image.streamed_files == 41
    assert seen_before_stored[0] > sum(sizes)  # the files were in the stream before the layer was complete
    assert contents(tmp_path / "streamed.tar") == expected


def test_a_retried_download_is_followed_into_its_new_file(layer: Layers, tmp_path: Path) -> None:
    source = layer(f("a", os.urandom(100_000)), f("b", os.urandom(100_000)))
    data = source.path.read_bytes()
    arrivals = LayerArrivals([source.digest])
    first, second = tmp_path / "first.partial", tmp_path / "second.partial"
    first.write_bytes(data[:150_000])
    arrivals.writing(source.digest, first)
    arrivals.written(source.digest, 150_000)
    assert arrivals.read(0, 0, 512) == data[:512]
    first.unlink()  # the failed attempt's file is thrown away; the retry writes anew
    second.write_bytes(data)
    arrivals.writing(source.digest, second)
    arrivals.written(source.digest, len(data))
    assert arrivals.read(0, 140_000, 20_000) == data[140_000:160_000]
    arrivals.stored(source.digest, second)
    assert arrivals.wait_stored(0) == second
    arrivals.release()


def test_a_layer_stored_by_another_process_after_a_failed_attempt_is_read_from_the_cache(
        layer: Layers, tmp_path: Path) -> None:
    source = layer(f("a", os.urandom(100_000)))
    data = source.path.read_bytes()
    failed = tmp_path / "failed.partial"
    failed.write_bytes(data[:30_000])
    arrivals = LayerArrivals([source.digest])
    arrivals.writing(source.digest, failed)
    arrivals.written(source.digest, 30_000)
    failed.unlink()
    arrivals.stored(source.digest, source.path)  # the other process's download, in the cache
    assert arrivals.read(0, 0, len(data)) == data
    arrivals.release()


def test_a_layer_that_never_arrives_stops_the_flattener_with_its_digest(layer: Layers, tmp_path: Path) -> None:
    base, top = layer(f("a")), layer(f("b"))
    arrivals = LayerArrivals([base.digest, top.digest])
    arrivals.stored(top.digest, top.path)
    threading.Timer(0.1, arrivals.close, ["the pull stage ended without it"]).start()
    with pytest.raises(LayerError, match=f"layer {base.digest} did not arrive: the pull stage ended without it"):
        run(arrivals, tmp_path / "streamed.tar")


@pytest.mark.parametrize("layers_come", [stored, arriving])
def test_a_reader_that_goes_away_spoils_the_stream_without_an_error(layer: Layers, layers_come, tmp_path: Path) -> None:
    layers = (layer(f("a", os.urandom(2_000_000))), layer(f("b", os.urandom(2_000_000))))
    reader, writer = os.pipe()
    os.close(reader)
    try:
        image = flatten_top_down(layers_come(*layers), writer)
    finally:
        os.close(writer)
    assert not image.intact and image.tree.entries == 2
