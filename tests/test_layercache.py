"""The layer cache: decompression, verification, no partial layers, one download per layer."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from imagegw.build.arrivals import LayerArrivals
from imagegw.config import Location
from imagegw.errors import DigestMismatch, LayerError, RegistryError, RegistryUnreachable, StorageError
from imagegw.registry.client import LayerDescriptor, PlatformSpec, RegistryClient, ResolvedImage
from imagegw.registry.layercache import LayerCache, fetch_layers
from imagegw.registry.reference import ImageRef
from tests.fake_registry import FakeRegistry, Reply, Seen, registry_error, sha256
from testsupport.images import LayerBuilder, push_image
from testsupport.registry import RunningRegistry

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"

LAYER = LayerBuilder().dir("etc").file("etc/motd", b"hello\n" * 2000).symlink("etc/link", "motd").tar()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    server = FakeRegistry()
    yield server
    server.stop()


@pytest.fixture
def client(fake: FakeRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(Location(name="test", url=fake.url), timeout=5) as registry_client:
        yield registry_client


@pytest.fixture
def cache(tmp_path: Path) -> LayerCache:
    return LayerCache(tmp_path / "cache")


def serve(fake: FakeRegistry, blob: bytes, media_type: str = GZIP) -> LayerDescriptor:
    return LayerDescriptor(fake.blob("x", blob), len(blob), media_type)


def layer_files(cache: LayerCache) -> list[str]:
    """Everything in the layer directory, partial files included."""
    return sorted(path.name for path in (cache.root / "layers").rglob("*") if path.is_file())


def blob_gets(fake: FakeRegistry) -> int:
    return len(fake.paths("/v2/x/blobs/"))


# --------------------------------------------------------------------------- decompression


@pytest.mark.parametrize(("blob", "media_type"), [
    (gzip.compress(LAYER), GZIP),
    (zstd(LAYER), ZSTD),
    (LAYER, TAR),
    (gzip.compress(LAYER[:1000]) + gzip.compress(LAYER[1000:]), GZIP),  # several gzip members
    (zstd(LAYER[:5000]) + zstd(LAYER[5000:]), ZSTD),  # several zstd frames
    (zstd(LAYER), GZIP),  # the magic bytes decide, not the media type
    (gzip.compress(LAYER), TAR),
], ids=["gzip", "zstd", "none", "gzip-members", "zstd-frames", "zstd-as-gzip", "gzip-as-tar"])
def test_layer_lands_uncompressed(fake: FakeRegistry, client: RegistryClient, cache: LayerCache, blob: bytes,
                                  media_type: str) -> None:
    layer = serve(fake, blob, media_type)
    received: list[int] = []
    path = cache.fetch(client, "x", layer, sha256(LAYER), received.append)
    assert path == cache.root / "layers" / "sha256" / f"{layer.digest.removeprefix('sha256:')}.tar"
    assert path.read_bytes() == LAYER
    assert cache.has(layer.digest)
    assert sum(received) == len(blob)
    assert layer_files(cache) == [path.name]


def test_cached_layer_needs_no_request(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    layer = serve(fake, gzip.compress(LAYER))
    first = cache.fetch(client, "x", layer)
    nowhere = RegistryClient(Location(name="gone", url="http://127.0.0.1:9"))
    assert cache.fetch(nowhere, "x", layer) == first
    assert blob_gets(fake) == 1


@pytest.mark.parametrize("make_blob", [gzip.compress, zstd], ids=["gzip", "zstd"])
def test_highly_compressed_layer_decompresses_in_bounded_memory(
        fake: FakeRegistry, client: RegistryClient, cache: LayerCache, make_blob: object) -> None:
    zeros = b"\0" * (64 << 20)
    layer = serve(fake, make_blob(zeros))  # type: ignore[operator]
    tracemalloc.start()
    try:
        path = cache.fetch(client, "x", layer, sha256(zeros))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == len(zeros)
    assert peak < 24 << 20, f"peak {peak >> 20} MiB while inflating 64 MiB"


# --------------------------------------------------------------------------- verification


def test_wrong_bytes_are_a_digest_mismatch(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    blob = gzip.compress(LAYER, mtime=0)
    layer = serve(fake, blob)
    impostor = blob[:4] + b"\x01\x02\x03\x04" + blob[8:]  # another mtime: same layer, other bytes
    fake.serve(f"/v2/x/blobs/{layer.digest}", impostor)
    with pytest.raises(DigestMismatch) as caught:
        cache.fetch(client, "x", layer)
    assert str(caught.value) == (f"layer {layer.digest} of {fake.host}/x: downloaded bytes have digest "
                                 f"{sha256(impostor)}, expected {layer.digest}")
    assert layer_files(cache) == []


def test_corrupt_compressed_bytes_are_a_digest_mismatch_first(fake: FakeRegistry, client: RegistryClient,
                                                              cache: LayerCache) -> None:
    blob = gzip.compress(LAYER)
    layer = serve(fake, blob)
    fake.serve(f"/v2/x/blobs/{layer.digest}", blob[:20] + b"\xff" * 40 + blob[60:])
    with pytest.raises(DigestMismatch, match="downloaded bytes have digest"):
        cache.fetch(client, "x", layer)
    assert layer_files(cache) == []


@pytest.mark.parametrize("size_change", [-1, +1])
def test_size_differs_from_the_manifest(fake: FakeRegistry, client: RegistryClient, cache: LayerCache,
                                        size_change: int) -> None:
    layer = serve(fake, gzip.compress(LAYER))
    declared = LayerDescriptor(layer.digest, layer.size + size_change, layer.media_type)
    expected = "registry sent more than" if size_change < 0 else f"registry sent {layer.size} bytes"
    with pytest.raises(DigestMismatch, match=expected):
        cache.fetch(client, "x", declared)
    assert layer_files(cache) == []


def test_diff_id_is_checked(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    layer = serve(fake, gzip.compress(LAYER))
    wrong = "sha256:" + "3" * 64
    with pytest.raises(DigestMismatch) as caught:
        cache.fetch(client, "x", layer, wrong)
    assert str(caught.value) == (f"layer {layer.digest} of {fake.host}/x: uncompressed content has digest "
                                 f"{sha256(LAYER)}, expected diff_id {wrong}")
    assert layer_files(cache) == []


@pytest.mark.parametrize(("blob", "problem"), [
    (gzip.compress(LAYER)[:-30], "gzip data ends in the middle of a member"),
    # zlib and ISA-L (used where installed) word their errors differently.
    (gzip.compress(LAYER)[:30] + b"\xff" * 30 + gzip.compress(LAYER)[60:], "(?i)invalid"),
    (gzip.compress(LAYER) + b"trailing garbage", "incorrect header check|unsupported compress method"),
    (zstd(LAYER)[:-10], "zstd data ends in the middle of a frame"),
    (zstd(LAYER)[:8] + b"\xff" * 30 + zstd(LAYER)[38:], "zstd"),
], ids=["gzip-truncated", "gzip-corrupt", "gzip-trailing-garbage", "zstd-truncated", "zstd-corrupt"])
def test_corrupt_layer_as_published(fake: FakeRegistry, client: RegistryClient, cache: LayerCache, blob: bytes,
                                    problem: str) -> None:
    layer = serve(fake, blob)  # the manifest's digest is of these very bytes
    with pytest.raises(LayerError) as caught:
        cache.fetch(client, "x", layer)
    assert str(caught.value).startswith(f"layer {layer.digest} of {fake.host}/x is corrupt: ")
    assert re.search(problem, str(caught.value))
    assert layer_files(cache) == []


def test_connection_dropped_mid_layer(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    blob = gzip.compress(LAYER)
    layer = serve(fake, blob)
    fake.routes[f"/v2/x/blobs/{layer.digest}"] = lambda seen: (200, {"Content-Length": str(len(blob))}, blob[:100])
    with pytest.raises(RegistryUnreachable, match=f"download of layer {layer.digest} of {fake.host}/x interrupted"):
        cache.fetch(client, "x", layer)
    assert layer_files(cache) == []


def test_connection_dropped_after_part_of_the_layer_was_written(fake: FakeRegistry, client: RegistryClient,
                                                                 cache: LayerCache) -> None:
    tar = LayerBuilder().file("big", os.urandom(3_000_000)).tar()
    blob = gzip.compress(tar)
    layer = serve(fake, blob)
    fake.routes[f"/v2/x/blobs/{layer.digest}"] = lambda seen: (200, {"Content-Length": str(len(blob))},
                                                               blob[:len(blob) // 2])
    arrivals = LayerArrivals([layer.digest])
    received: list[int] = []
    try:
        with pytest.raises(RegistryUnreachable) as caught:
            cache.fetch(client, "x", layer, sha256(tar), received.append, arrivals)
        assert arrivals.read(0, 0, 512) == tar[:512], "the start of the layer was in a partial file"
    finally:
        arrivals.release()
    assert str(caught.value) == (f"download of layer {layer.digest} of {fake.host}/x interrupted: "
                                 "connection broken mid-transfer")
    assert 0 < sum(received) < len(blob), "the cut came mid-stream"
    assert not cache.has(layer.digest)
    assert layer_files(cache) == [], "the partial file is gone"


def test_arrivals_follow_a_download_into_its_retry(fake: FakeRegistry, client: RegistryClient,
                                                   cache: LayerCache) -> None:
    tar = LayerBuilder().file("big", os.urandom(3_000_000)).tar()  # the first 1 MiB chunk arrives
    blob = gzip.compress(tar)
    layer = serve(fake, blob)
    attempts: list[int] = []

    def reply(seen: Seen) -> Reply:
        attempts.append(1)
        return 200, {"Content-Length": str(len(blob))}, blob if len(attempts) > 1 else blob[:len(blob) // 2]
    fake.routes[f"/v2/x/blobs/{layer.digest}"] = reply
    arrivals = LayerArrivals([layer.digest])
    with pytest.raises(RegistryUnreachable):
        cache.fetch(client, "x", layer, arrivals=arrivals)
    assert arrivals.read(0, 0, 512) == tar[:512]  # a reader already had the start of the failed attempt
    cache.fetch(client, "x", layer, arrivals=arrivals)
    assert arrivals.read(0, 0, len(tar) + 1) == tar
    assert arrivals.wait_stored(0) == cache.path(layer.digest)
    arrivals.release()


def test_missing_blob(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    layer = LayerDescriptor("sha256:" + "4" * 64, 10, GZIP)
    fake.routes[f"/v2/x/blobs/{layer.digest}"] = lambda seen: registry_error(404, "BLOB_UNKNOWN", "blob unknown")
    with pytest.raises(RegistryError, match="is missing from"):
        cache.fetch(client, "x", layer)
    assert layer_files(cache) == []


def test_partial_of_a_dead_process_is_removed(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    layer = serve(fake, gzip.compress(LAYER))
    stale = cache.path(layer.digest).with_name(f".{layer.digest.removeprefix('sha256:')}.abandoned.partial")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a layer")
    cache.fetch(client, "x", layer)
    assert layer_files(cache) == [cache.path(layer.digest).name]


def test_full_disk_is_a_storage_error_naming_the_directory(fake: FakeRegistry, client: RegistryClient,
                                                            small_disk: Path) -> None:
    cache = LayerCache(small_disk)
    tar = LayerBuilder().file("big", os.urandom(1 << 20)).tar()  # four times the disk
    layer = serve(fake, gzip.compress(tar))
    with pytest.raises(StorageError) as caught:
        cache.fetch(client, "x", layer, sha256(tar))
    directory = small_disk / "layers" / "sha256"
    assert str(caught.value) == (f"{directory}: No space left on device "
                                 f"(storing layer {layer.digest} of {fake.host}/x)")
    assert not cache.path(layer.digest).exists()
    assert layer_files(cache) == []
    # The partial file's space was given back: a layer that fits is stored.
    small = serve(fake, gzip.compress(LAYER))
    assert cache.fetch(client, "x", small, sha256(LAYER)).read_bytes() == LAYER


def test_digest_that_is_not_sha256_is_refused(cache: LayerCache) -> None:
    with pytest.raises(LayerError, match="not a sha256 digest"):
        cache.path("sha256:../../etc/passwd")


# --------------------------------------------------------------------------- concurrency


def slow_blob(fake: FakeRegistry, blob: bytes, delay: float) -> LayerDescriptor:
    """Serve ``blob`` after ``delay`` seconds, so concurrent fetches of it overlap."""
    layer = serve(fake, blob)

    def reply(seen: Seen) -> Reply:
        time.sleep(delay)
        return 200, {}, blob
    fake.routes[f"/v2/x/blobs/{layer.digest}"] = reply
    return layer


def test_two_threads_download_a_layer_once(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    layer = slow_blob(fake, gzip.compress(LAYER), 0.3)
    start = threading.Barrier(2)
    paths: list[Path] = []

    def fetch() -> None:
        start.wait()
        paths.append(cache.fetch(client, "x", layer))
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert paths == [cache.path(layer.digest)] * 2
    assert blob_gets(fake) == 1


FETCH_SCRIPT = """
import sys
from pathlib import Path
from imagegw.build.arrivals import LayerArrivals
from imagegw.config import Location
from imagegw.registry.layercache import LayerCache
from imagegw.registry.client import LayerDescriptor, RegistryClient
root, url, digest, size = sys.argv[1:]
with RegistryClient(Location(name="test", url=url)) as client:
    LayerCache(Path(root)).fetch(client, "x", LayerDescriptor(digest, int(size), "gzip"))
"""


def test_two_processes_download_a_layer_once(fake: FakeRegistry, cache: LayerCache) -> None:
    layer = slow_blob(fake, gzip.compress(LAYER), 0.5)
    arguments = [sys.executable, "-c", FETCH_SCRIPT, str(cache.root), fake.url, layer.digest, str(layer.size)]
    processes = [subprocess.Popen(arguments, cwd=Path(__file__).parent.parent) for _ in range(2)]
    assert [process.wait(timeout=20) for process in processes] == [0, 0]
    assert cache.path(layer.digest).read_bytes() == LAYER
    assert blob_gets(fake) == 1


def fake_image(fake: FakeRegistry, blobs: list[bytes], tars: list[bytes]) -> ResolvedImage:
    layers = tuple(serve(fake, blob) for blob in blobs)
    location = Location(name="test", url=fake.url)
    config = {"rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in tars]}}
    digest = "sha256:" + "5" * 64
    return ResolvedImage(ImageRef(location, "x", "1.0"), digest, GZIP, config, layers, digest)


def test_fetch_layers_in_order_with_progress(fake: FakeRegistry, client: RegistryClient, cache: LayerCache) -> None:
    tars = [LayerBuilder().file(f"f{i}", bytes([i]) * 5000).tar() for i in range(5)]
    tars.append(tars[1])  # a layer repeated in one image is fetched once
    image = fake_image(fake, [gzip.compress(tar) for tar in tars], tars)
    cache.fetch(client, "x", image.layers[0])  # already cached: no download, no progress
    reported: dict[str, int] = {}
    lock = threading.Lock()

    def progress(digest: str, new_bytes: int) -> None:
        with lock:
            reported[digest] = reported.get(digest, 0) + new_bytes
    paths = fetch_layers(client, image, cache, parallel=3, progress=progress)
    assert [path.read_bytes() for path in paths] == tars
    assert blob_gets(fake) == 5
    assert reported == {layer.digest: layer.size for layer in image.layers[1:5]}


def test_fetch_layers_stops_at_the_first_failure(fake: FakeRegistry, client: RegistryClient,
                                                 cache: LayerCache) -> None:
    tars = [LayerBuilder().file(f"f{i}", bytes([i]) * 5000).tar() for i in range(4)]
    image = fake_image(fake, [gzip.compress(tar) for tar in tars], tars)
    fake.routes[f"/v2/x/blobs/{image.layers[2].digest}"] = lambda seen: registry_error(500, "UNKNOWN", "disk on fire")
    with pytest.raises(RegistryUnreachable, match="HTTP 500"):
        fetch_layers(client, image, cache, parallel=2)
    assert all(not name.endswith(".partial") for name in layer_files(cache))


def test_fetch_layers_of_an_empty_image(client: RegistryClient, cache: LayerCache, fake: FakeRegistry) -> None:
    assert fetch_layers(client, fake_image(fake, [], []), cache) == []


# --------------------------------------------------------------------------- the real registry


@pytest.fixture
def real_client(registry: RunningRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(Location(name="test", url=registry.url), timeout=10) as client:
        yield client


def resolve(client: RegistryClient, registry: RunningRegistry, repository: str) -> ResolvedImage:
    return client.resolve(ImageRef(Location(name="test", url=registry.url), repository, "1.0"), PlatformSpec())


def test_real_registry_compressions_give_identical_tars(registry: RunningRegistry, real_client: RegistryClient,
                                                        cache: LayerCache) -> None:
    repository = f"test/compressions-{uuid.uuid4().hex[:8]}"
    tar = LayerBuilder().dir("opt").file("opt/data", uuid.uuid4().bytes * 1000).tar()
    push_image(registry, repository, "1.0", [tar, tar, tar], compression=["gzip", "zstd", "none"])
    image = resolve(real_client, registry, repository)
    assert len({layer.digest for layer in image.layers}) == 3
    paths = fetch_layers(real_client, image, cache)
    assert [path.read_bytes() for path in paths] == [tar] * 3


def test_real_registry_corrupted_blob(registry: RunningRegistry, real_client: RegistryClient,
                                      cache: LayerCache) -> None:
    repository = f"test/corrupt-{uuid.uuid4().hex[:8]}"
    tar = LayerBuilder().file("data", uuid.uuid4().bytes * 1000).tar()
    built = push_image(registry, repository, "1.0", [tar])
    image = resolve(real_client, registry, repository)
    blob_file = registry.blob_path(built.layer_digests[0])
    data = bytearray(blob_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob_file.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=f"layer {built.layer_digests[0]} of {registry.host}/{repository}"):
        fetch_layers(real_client, image, cache)
    assert layer_files(cache) == []


def test_real_registry_two_threads_one_download(registry: RunningRegistry, real_client: RegistryClient,
                                                cache: LayerCache) -> None:
    repository = f"test/shared-{uuid.uuid4().hex[:8]}"
    push_image(registry, repository, "1.0", [LayerBuilder().file("data", uuid.uuid4().bytes * 10000).tar()])
    layer = resolve(real_client, registry, repository).layers[0]
    downloading = threading.Event()
    second_progress: list[int] = []

    def first_progress(new_bytes: int) -> None:
        downloading.set()
        time.sleep(0.3)  # hold the layer's lock while the second fetch arrives

    first = threading.Thread(target=cache.fetch, args=(real_client, repository, layer, None, first_progress))
    first.start()
    assert downloading.wait(5)
    assert cache.fetch(real_client, repository, layer, None, second_progress.append) == cache.path(layer.digest)
    first.join()
    assert second_progress == [], "the second fetch found the layer cached"
    request_line = re.compile(rf'"GET /v2/{re.escape(repository)}/blobs/{layer.digest} HTTP/1.1" 200')
    assert len(request_line.findall(registry.log_tail(100_000))) == 1


def test_real_token_registry_parallel_layers(token_registry: RunningRegistry, cache: LayerCache) -> None:
    repository = f"test/parallel-{uuid.uuid4().hex[:8]}"
    tars = [LayerBuilder().file(f"f{i}", uuid.uuid4().bytes * 1000).tar() for i in range(4)]
    push_image(token_registry, repository, "1.0", list[LayerBuilder | bytes](tars))
    with RegistryClient(Location(name="test", url=token_registry.url), timeout=10) as client:
        image = resolve(client, token_registry, repository)
        paths = fetch_layers(client, image, cache, parallel=4)
    assert [path.read_bytes() for path in paths] == tars


def test_a_download_stops_once_the_build_that_wanted_it_is_over(fake: FakeRegistry, client: RegistryClient,
                                                                 cache: LayerCache) -> None:
    tar = LayerBuilder().file("big", os.urandom(3_000_000)).tar()  # three 1 MiB chunks
    layer = serve(fake, gzip.compress(tar))
    arrivals = LayerArrivals([layer.digest])

    with pytest.raises(LayerError, match="download abandoned"):
        # The build is cancelled once the first chunk is in.
        cache.fetch(client, "x", layer, sha256(tar), lambda _: arrivals.release(), arrivals)

    assert layer_files(cache) == [], "neither the layer nor its partial file is left in the cache"
