"""Bounds on hostile input (``Limits``): each is configurable, refused with a message naming it, not
retried, and leaves nothing behind; a compression bomb stops fast in bounded memory."""

from __future__ import annotations

import json
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import zstandard

from imagegw.build.flatten import LayerSource, flatten_layers
from imagegw.config import Limits, load_settings
from imagegw.errors import TRANSIENT_ERRORS, ConfigError, LimitExceeded
from imagegw.plan import image_bytes_limit
from imagegw.publish import LocalPublisher
from imagegw.registry import LayerCache, PlatformSpec, RegistryClient
from tests.fake_registry import FakeRegistry, location_of, ref_to, tar_of
from tests.gateway_fixtures import Gateway, pull
from testsupport.images import LayerBuilder, push_image

MiB = 1 << 20

# --------------------------------------------------------------------------- configuration


def write_config(tmp_path: Path, limits: Any) -> Path:
    path = tmp_path / "imagemanager.json"
    path.write_text(json.dumps({"Limits": limits, "Platforms": {
        "c": {"accesstype": "local", "local": {"imageDir": str(tmp_path / "images")}}}}))
    return path


def test_limits_have_documented_defaults_and_take_numbers_or_sizes(tmp_path: Path) -> None:
    assert load_settings(write_config(tmp_path, {})).limits == Limits(
        manifest_bytes=4 * MiB, layers=128, image_bytes=None, entries=1_000_000, path_depth=256, header_bytes=MiB)
    limits = load_settings(write_config(tmp_path, {
        "maxManifestBytes": "8M", "maxLayers": 200, "maxImageBytes": "1.5T", "maxEntries": 5_000_000,
        "maxPathDepth": 512, "maxHeaderBytes": 65536})).limits
    assert limits == Limits(manifest_bytes=8 * MiB, layers=200, image_bytes=int(1.5 * (1 << 40)),
                            entries=5_000_000, path_depth=512, header_bytes=65536)
    assert load_settings(write_config(tmp_path, {"maxImageBytes": None})).limits.image_bytes is None


@pytest.mark.parametrize("limits, key", [
    ({"maxLayers": 0}, "Limits.maxLayers"),
    ({"maxEntries": "many"}, "Limits.maxEntries"),
    ({"maxPathDepth": True}, "Limits.maxPathDepth"),
    ({"maxHeaderBytes": "25%"}, "Limits.maxHeaderBytes"),
    ({"maxManifestBytes": -1}, "Limits.maxManifestBytes"),
    ({"maxManifestBytes": None}, "Limits.maxManifestBytes"),
    ({"maxImageBytes": "lots"}, "Limits.maxImageBytes"),
    ({"maxLayer": 3}, "Limits.maxLayer"),
    ([128], "Limits"),
])
def test_a_bad_limit_is_an_error_naming_its_key(tmp_path: Path, limits: Any, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} in "):
        load_settings(write_config(tmp_path, limits))


def test_refusals_are_not_retried() -> None:
    assert not issubclass(LimitExceeded, TRANSIENT_ERRORS)


def test_the_image_size_limit_defaults_to_the_free_space_of_the_image_directory(tmp_path: Path) -> None:
    publisher = LocalPublisher(tmp_path / "not-yet" / "images")  # made on publishing: its disk counts
    free = publisher.free_bytes()
    assert free is not None and free > 0
    limit = image_bytes_limit(Limits(), publisher)
    assert limit is not None and limit.free_in == str(publisher) and abs(limit.bytes - free) < 64 * MiB
    assert image_bytes_limit(Limits(image_bytes=1000), publisher).bytes == 1000  # type: ignore[union-attr]


# --------------------------------------------------------------------------- documents (fake registry)


def test_an_oversized_config_or_index_is_refused_naming_the_limit(fake: FakeRegistry) -> None:
    image = fake.image("team/fat-config", "1", [tar_of("a", b"a")])
    fake.serve(f"/v2/team/fat-config/blobs/{image.manifest['config']['digest']}", b"{" + b" " * 5000 + b"}")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "0" * 64,
                            "size": 10, "platform": {"os": "linux", "architecture": f"arch{i}"}}
                           for i in range(100)]}
    fake.manifest("team/wide-index", ["1"], index, "application/vnd.oci.image.index.v1+json")

    with RegistryClient(location_of(fake), timeout=5, limits=Limits(manifest_bytes=4096)) as client:
        with pytest.raises(LimitExceeded, match=r"^image config of .*team/fat-config:1 is larger than 4096 bytes "
                                                r"\(the limit, Limits.maxManifestBytes, is 4096; raise it"):
            client.resolve(ref_to(fake, "team/fat-config", "1"), PlatformSpec())
        with pytest.raises(LimitExceeded, match=r"^manifest of .*team/wide-index:1 is larger than 4096 bytes"):
            client.resolve(ref_to(fake, "team/wide-index", "1"), PlatformSpec())


# --------------------------------------------------------------------------- the model


def test_a_path_too_deep_through_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    tar = tmp_path / "deep.tar"
    tar.write_bytes(LayerBuilder().symlink("l", "/a/b/c/d/e/f/g/h").file("l/i/j", b"deep").tar())
    flatten_layers([LayerSource(tar, "sha256:deep")], limits=Limits(path_depth=10))  # a/b/c/d/e/f/g/h/i/j: 10

    with pytest.raises(LimitExceeded, match=r"^layer sha256:deep: 'l/i/j' lies more than 9 names deep "
                                            r"\(symbolic links followed\) \(the limit, Limits.maxPathDepth, is 9;"):
        flatten_layers([LayerSource(tar, "sha256:deep")], limits=Limits(path_depth=9))


def test_entries_are_counted_across_the_layers(tmp_path: Path) -> None:
    layers = []
    for index in range(2):
        path = tmp_path / f"{index}.tar"
        builder = LayerBuilder()
        for number in range(30):
            builder.file(f"f{index}-{number}", b"x")
        path.write_bytes(builder.tar())
        layers.append(LayerSource(path, f"sha256:layer{index}"))

    assert flatten_layers(layers, limits=Limits(entries=60)).entries == 60
    with pytest.raises(LimitExceeded, match=r"^layer sha256:layer1 brings the image's tar entries to 60 \(the limit, "
                                            r"Limits.maxEntries, is 59;"):
        flatten_layers(layers, limits=Limits(entries=59))
    # One layer alone: its reading stops at the limit, whether the fast reader or tarfile reads it.
    with pytest.raises(LimitExceeded, match=r"^layer sha256:layer0: more than 29 tar entries"):
        flatten_layers(layers[:1], limits=Limits(entries=29))


def test_tarfile_reading_a_layer_is_held_to_the_header_limit_too(tmp_path: Path) -> None:
    path = tmp_path / "global.tar"
    # A PAX global header sends the layer to tarfile; the local one after it is over the limit.
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as out:
        info = tarfile.TarInfo("big-xattr")
        info.pax_headers = {"SCHILY.xattr.user.big": "v" * 20_000}
        out.addfile(info)

    with pytest.raises(LimitExceeded, match=r"^layer sha256:global: the tar header at byte 1024 is 20\d\d\d bytes "
                                            r"\(the limit, Limits.maxHeaderBytes, is 16384;"):
        flatten_layers([LayerSource(path, "sha256:global")], limits=Limits(header_bytes=16384))


# --------------------------------------------------------------------------- through the pipeline


def published_files(gateway: Gateway) -> list[str]:
    return sorted(path.name for path in gateway.image_dir.iterdir()) if gateway.image_dir.exists() else []


def assert_nothing_left(gateway: Gateway) -> None:
    """No partial layer in the cache, no scratch directory, nothing published."""
    assert LayerCache(gateway.cache_dir).partials() == []
    expand = gateway.root / "expand"
    assert not expand.exists() or list(expand.iterdir()) == []
    assert published_files(gateway) == []


def refused(gateway: Gateway, image: str, message: str) -> str:
    """Pull ``image``: it must fail with ``message`` in its record, and leave nothing behind."""
    state, record = pull(gateway, image)
    assert state.is_failed() and record["status"] == "FAILURE", record
    assert message in record["status_message"], record["status_message"]
    assert_nothing_left(gateway)
    return str(record["status_message"])


def test_an_image_of_too_many_layers_is_refused(gateway: Gateway) -> None:
    push_image(gateway.registry, "test/layered", "1", [LayerBuilder().file(f"f{n}", b"x") for n in range(4)])
    gateway.write_config(Limits={"maxLayers": 3})

    message = refused(gateway, gateway.image("test/layered:1"),
                      "test/layered:1 has 4 layers (the limit, Limits.maxLayers, is 3;")

    assert message.endswith("raise it in the gateway's configuration to accept this image)")


def test_an_oversized_manifest_is_refused(gateway: Gateway, fake: FakeRegistry) -> None:
    fake.image("team/app", "1", [tar_of("a", b"a")])
    huge = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "annotations": {"padding": "p" * (5 * MiB)}, "layers": [], "config": {}}
    fake.manifest("team/app", ["huge"], huge, "application/vnd.oci.image.manifest.v1+json")
    gateway.write_config(Locations={fake.host: {"url": fake.url, "insecure": True}})

    refused(gateway, f"{fake.host}/team/app:huge",
            f"manifest of {fake.host}/team/app:huge is larger than 4194304 bytes (the limit, Limits.maxManifestBytes")


def test_a_pax_header_over_the_limit_is_refused_naming_the_layer(gateway: Gateway) -> None:
    info = tarfile.TarInfo("labelled")
    info.size, info.pax_headers = 1, {"SCHILY.xattr.security.selinux": "s" * 100_000}
    built = push_image(gateway.registry, "test/pax", "1", [LayerBuilder().file("a", b"a"),
                                                           LayerBuilder().raw(info, b"x")])
    gateway.write_config(Limits={"maxHeaderBytes": 65536})

    refused(gateway, gateway.image("test/pax:1"), f"layer {built.layer_digests[1]}: the tar header at byte 0 is ")


def test_too_many_entries_are_refused(gateway: Gateway) -> None:
    layers = [LayerBuilder().dir(f"d{layer}") for layer in range(3)]
    for layer, builder in enumerate(layers):
        for number in range(40):
            builder.file(f"d{layer}/f{number}", b"x")
    push_image(gateway.registry, "test/many", "1", layers)
    gateway.write_config(Limits={"maxEntries": 100})

    # Refused by whichever pass counts past the limit first: the files streamed, or the entries read.
    message = refused(gateway, gateway.image("test/many:1"), "(the limit, Limits.maxEntries, is 100;")
    assert "brings the image's tar entries " in message


def test_a_path_too_deep_is_refused(gateway: Gateway) -> None:
    deep = "/".join(f"d{level}" for level in range(40))
    push_image(gateway.registry, "test/deep", "1", [LayerBuilder().file(deep, b"deep")])
    gateway.write_config(Limits={"maxPathDepth": 32})

    refused(gateway, gateway.image("test/deep:1"), "lies more than 32 names deep (symbolic links followed) "
                                    "(the limit, Limits.maxPathDepth, is 32;")


def test_by_default_an_image_larger_than_the_image_directory_has_free_is_refused(
        gateway: Gateway, small_disk: Path) -> None:
    gateway.write_config(Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(small_disk)}}})
    push_image(gateway.registry, "test/roomy", "1", [LayerBuilder().file("a", bytes(512 * 1024))])

    refused(gateway, gateway.image("test/roomy:1"), f"bytes uncompressed, more than {small_disk} had free "
                                                    "(the limit, Limits.maxImageBytes, is ")
    assert list(small_disk.iterdir()) == []


# --------------------------------------------------------------------------- a compression bomb


def bomb_header(size: int) -> bytes:
    """The tar header of one file of ``size`` zero bytes (PAX: past 8 GiB the ustar size field overflows)."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT)


def gzip_bomb(gib: int) -> bytes:
    """A gzip layer inflating to ``gib`` GiB of tar, made without compressing them: after a full flush
    deflate starts afresh, so each MiB of zeros compresses to the same bytes, which are repeated."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    header = bomb_header(gib << 30)
    head = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    mebibyte = deflate.compress(bytes(MiB)) + deflate.flush(zlib.Z_FULL_FLUSH)
    # The trailer's CRC is left zero: the inflating must stop long before it.
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + head + mebibyte * (gib << 10) + deflate.flush()
            + bytes(4) + ((len(header) + (gib << 30)) & 0xFFFFFFFF).to_bytes(4, "little"))


def zstd_bomb(gib: int) -> bytes:
    """A zstd layer inflating to ``gib`` GiB of tar: one frame of 128 MiB of zeros (4 KiB), repeated."""
    compressor = zstandard.ZstdCompressor(level=1)
    frame = compressor.compress(bytes(128 * MiB))
    return compressor.compress(bomb_header(gib << 30)) + frame * (gib * 8)


def peak_rss_reset() -> bool:
    """Reset this process's peak resident size (VmHWM), so the next reading is the peak since now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("compression, make, gib", [("gzip", gzip_bomb, 8), ("zstd", zstd_bomb, 16)])
def test_a_compression_bomb_stops_fast_in_bounded_memory_leaving_nothing(
        gateway: Gateway, compression: str, make: Any, gib: int) -> None:
    bomb = make(gib)
    assert len(bomb) < (10 * MiB if compression == "gzip" else MiB)
    # The gateway tells a layer's compression by its magic bytes, so the blob is pushed as it is.
    built = push_image(gateway.registry, f"test/bomb-{compression}", "1", [bomb], compression="none")
    gateway.write_config(Limits={"maxImageBytes": 64 * MiB})
    # A first flow run (here, of an image that does not exist) costs Prefect memory the bomb must not be blamed for.
    pull(gateway, gateway.image("test/warm-up:1"))
    can_measure = peak_rss_reset()
    before = current_rss()

    started = time.monotonic()
    message = refused(gateway, gateway.image(f"test/bomb-{compression}:1"),
                      f"test/bomb-{compression}:1: its layers hold more than {64 * MiB} bytes uncompressed "
                      "(the limit, Limits.maxImageBytes, is 67108864;")
    elapsed = time.monotonic() - started

    growth = peak_rss() - before
    print(f"{compression} bomb ({len(bomb) / MiB:.1f} MiB -> {gib} GiB): refused in {elapsed:.2f} s, "
          f"peak RSS +{growth / MiB:.0f} MiB: {message}")
    assert elapsed < 20
    if can_measure:
        assert growth < 200 * MiB
    assert not LayerCache(gateway.cache_dir).has(built.layer_digests[0])
    cached = [path for path in gateway.cache_dir.rglob("*") if path.is_file() and path.suffix == ".tar"]
    assert sum(path.stat().st_size for path in cached) < 64 * MiB
