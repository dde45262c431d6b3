"""Housekeeping: the layer cache kept under its cap without breaking a running pull, and dead pulls' leftovers
removed; on real directories and locks, then through the pull and expire flows."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from imagegw.config import SizeLimit
from imagegw.disk import scratch_directory
from imagegw.housekeeping import (
    LEFTOVER_AGE,
    Eviction,
    Leftovers,
    evict_layers,
    remove_dead_pulls_leftovers,
    remove_leftovers,
)
from imagegw.registry import LayerCache, LayerDescriptor
from tests.fake_registry import FakeRegistry, client_for
from tests.gateway_fixtures import Gateway, pull
from tests.squashfs_reader import read_tree
from testsupport.images import LayerBuilder, push_image

HOUR = 3600.0
NOW = time.time()


@pytest.fixture
def cache(tmp_path: Path) -> LayerCache:
    return LayerCache(tmp_path / "cache")


def digest_of(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def cached(cache: LayerCache, name: str, size: int, used_hours_ago: float) -> str:
    """A layer tar of ``size`` bytes in the cache, last used ``used_hours_ago``; its digest."""
    digest = digest_of(name)
    path = cache.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    os.utime(path, (NOW - used_hours_ago * HOUR, NOW - used_hours_ago * HOUR))
    return digest


def left_in(cache: LayerCache, *digests: str) -> list[str]:
    return [digest for digest in digests if cache.has(digest)]


@contextmanager
def downloading(cache: LayerCache, digest: str) -> Iterator[None]:
    """Hold a layer's download lock, as a download in progress (in this or another process) does."""
    locks = cache.root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{digest.removeprefix('sha256:')}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- eviction


def test_least_recently_used_layers_go_first_until_the_cache_is_under_its_cap(cache: LayerCache) -> None:
    oldest = cached(cache, "oldest", 4000, used_hours_ago=50)
    old = cached(cache, "old", 3000, used_hours_ago=20)
    recent = cached(cache, "recent", 2000, used_hours_ago=2)
    newest = cached(cache, "newest", 1000, used_hours_ago=0)

    eviction = evict_layers(cache, SizeLimit(bytes=3500))

    assert left_in(cache, oldest, old, recent, newest) == [recent, newest]
    assert eviction == Eviction(cap=3500, evicted=2, bytes_evicted=7000, held=[], bytes_cached=3000)
    assert evict_layers(cache, SizeLimit(bytes=3500)).evicted == 0  # already under the cap


def test_a_cache_under_its_cap_keeps_everything(cache: LayerCache) -> None:
    layers = [cached(cache, name, 1000, used_hours_ago=hours) for name, hours in [("a", 100), ("b", 1)]]

    eviction = evict_layers(cache, SizeLimit(bytes=2000))

    assert left_in(cache, *layers) == layers and eviction.evicted == 0 and eviction.bytes_cached == 2000


def test_a_percentage_cap_is_of_the_disk_holding_the_cache(cache: LayerCache, tmp_path: Path) -> None:
    cached(cache, "a", 1000, used_hours_ago=1)
    disk = os.statvfs(tmp_path)

    eviction = evict_layers(cache, SizeLimit(percent=10))

    assert eviction.cap == disk.f_blocks * disk.f_frsize // 10
    assert eviction.evicted == 0


def test_an_empty_or_missing_cache_has_nothing_to_evict(cache: LayerCache) -> None:
    assert evict_layers(cache, SizeLimit(bytes=1)) == Eviction(cap=1)


def test_a_layer_a_pull_holds_is_kept_and_the_next_one_goes_instead(cache: LayerCache) -> None:
    held = cached(cache, "held", 4000, used_hours_ago=50)
    old = cached(cache, "old", 3000, used_hours_ago=20)
    recent = cached(cache, "recent", 2000, used_hours_ago=1)

    with cache.holding([held]):
        # A long pull: its hold began long ago, so its layer is the least recently used.
        os.utime(cache.path(held), (NOW - 50 * HOUR, NOW - 50 * HOUR))
        eviction = evict_layers(cache, SizeLimit(bytes=6000))
        assert cache.path(held).read_bytes() == b"\0" * 4000  # still readable by the pull

    assert left_in(cache, held, old, recent) == [held, recent]
    assert eviction.held == [held] and eviction.evicted == 1 and eviction.bytes_evicted == 3000
    assert eviction.bytes_cached == 6000
    assert evict_layers(cache, SizeLimit(bytes=5000)).evicted == 1  # released: it goes first next time
    assert left_in(cache, held, recent) == [recent]


def test_layers_pulls_hold_may_keep_the_cache_over_its_cap(cache: LayerCache) -> None:
    layers = [cached(cache, name, 1000, used_hours_ago=1) for name in ("a", "b")]

    with cache.holding(layers):
        eviction = evict_layers(cache, SizeLimit(bytes=1))

    assert left_in(cache, *layers) == layers
    assert eviction.evicted == 0 and eviction.bytes_cached == 2000 and sorted(eviction.held) == sorted(layers)


def test_a_pull_in_another_process_keeps_its_layers(cache: LayerCache) -> None:
    held = cached(cache, "held", 1000, used_hours_ago=10)
    free = cached(cache, "free", 1000, used_hours_ago=5)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from imagegw.registry import LayerCache\n"
         f"with LayerCache(Path({str(cache.root)!r})).holding([{held!r}]):\n"
         "    print('holding', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        eviction = evict_layers(cache, SizeLimit(bytes=1))
    finally:
        holder.communicate("done\n", timeout=30)

    assert left_in(cache, held, free) == [held]
    assert eviction.held == [held] and eviction.evicted == 1


def test_holding_a_layer_marks_it_recently_used(cache: LayerCache) -> None:
    wanted = cached(cache, "wanted again", 1000, used_hours_ago=50)
    other = cached(cache, "other", 1000, used_hours_ago=20)

    with cache.holding([wanted, digest_of("not cached yet")]):
        pass
    evict_layers(cache, SizeLimit(bytes=1000))

    assert left_in(cache, wanted, other) == [wanted]


def test_a_cache_hit_marks_the_layer_recently_used(cache: LayerCache, fake: FakeRegistry) -> None:
    tar = LayerBuilder().file("hello", b"hello\n").tar()
    blob = gzip.compress(tar)
    layer = LayerDescriptor(fake.blob("x", blob), len(blob), "application/vnd.oci.image.layer.v1.tar+gzip")
    other = cached(cache, "other", 100, used_hours_ago=20)
    with client_for(fake) as client:
        path = cache.fetch(client, "x", layer)
        os.utime(path, (NOW - 50 * HOUR, NOW - 50 * HOUR))
        cache.fetch(client, "x", layer)  # from the cache

    evict_layers(cache, SizeLimit(bytes=len(tar)))

    assert left_in(cache, layer.digest, other) == [layer.digest]


def test_a_layer_being_downloaded_is_not_evicted(cache: LayerCache) -> None:
    # The moment between a download's rename to the final name and its unlock: the downloader has not
    # handed the path to its pull yet.
    downloaded = cached(cache, "just downloaded", 1000, used_hours_ago=30)
    other = cached(cache, "other", 1000, used_hours_ago=20)

    with downloading(cache, downloaded):
        eviction = evict_layers(cache, SizeLimit(bytes=1000))

    assert left_in(cache, downloaded, other) == [downloaded] and eviction.held == [downloaded]


# --------------------------------------------------------------------------- leftovers of dead pulls


def aged(path: Path, hours: float) -> Path:
    os.utime(path, (NOW - hours * HOUR, NOW - hours * HOUR), follow_symlinks=False)
    return path


def scratch(expand: Path, name: str, hours: float, content: bytes = b"half a squashfs") -> Path:
    """A scratch directory holding one file, all last written ``hours`` ago."""
    directory = expand / name
    directory.mkdir(parents=True)
    (directory / "image.squashfs").write_bytes(content)
    aged(directory / "image.squashfs", hours)
    return aged(directory, hours)


def partial(cache: LayerCache, name: str, hours: float, size: int) -> Path:
    path = cache.path(digest_of(name)).with_name(f".{digest_of(name).removeprefix('sha256:')}.x1y2.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return aged(path, hours)


def test_leftovers_older_than_a_day_are_removed_and_newer_ones_kept(cache: LayerCache, tmp_path: Path) -> None:
    assert LEFTOVER_AGE == 24 * HOUR
    expand = tmp_path / "expand"
    dead_pull = scratch(expand, "pull-dead", 30, b"x" * 5000)
    dead_import = scratch(expand, "import-dead", 25, b"y" * 700)
    live_pull = scratch(expand, "pull-live", 1)
    # Created long ago, but its squashfs is still being written: a pull that is slow, not dead.
    long_pull = scratch(expand, "pull-long", 40)
    aged(long_pull / "image.squashfs", 0.1)
    aged(long_pull, 40)
    not_ours = scratch(expand, "somebody-elses", 100)
    dead_partial = partial(cache, "dead", 48, 3000)
    fresh_partial = partial(cache, "fresh", 2, 3000)
    layer = cached(cache, "a layer", 1000, used_hours_ago=100)

    leftovers = remove_leftovers(cache, expand)

    assert not dead_pull.exists() and not dead_import.exists() and not dead_partial.exists()
    assert live_pull.exists() and long_pull.exists() and not_ours.exists() and fresh_partial.exists()
    assert cache.has(layer)  # layers are eviction's business, not leftovers
    assert (leftovers.removed, leftovers.bytes_removed) == (3, 5000 + 700 + 3000)


def test_an_old_partial_whose_download_still_runs_is_kept(cache: LayerCache, tmp_path: Path) -> None:
    stalled = partial(cache, "slow", 30, 3000)

    with downloading(cache, digest_of("slow")):
        leftovers = remove_leftovers(cache, tmp_path / "expand")

    assert stalled.exists() and leftovers.removed == 0
    assert remove_leftovers(cache, tmp_path / "expand").removed == 1  # its download died since
    assert not stalled.exists()


def test_a_killed_owners_scratch_goes_at_once_and_a_live_ones_stays(cache: LayerCache, tmp_path: Path) -> None:
    expand = tmp_path / "expand"
    owner = subprocess.Popen(  # a pull in another process: its scratch directory, with a squashfs being written
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from imagegw.disk import scratch_directory\n"
         "with scratch_directory(Path(sys.argv[1]), 'pull-') as scratch:\n"
         "    (scratch / 'image.squashfs').write_bytes(b'x' * 5000)\n"
         "    print(scratch, flush=True)\n"
         "    time.sleep(600)\n", str(expand)], stdout=subprocess.PIPE)
    try:
        killed = Path(owner.stdout.readline().decode().strip())
        dead_partial = partial(cache, "dead", 0, 3000)
        with scratch_directory(expand, "import-") as live, downloading(cache, digest_of("live")):
            live_partial = partial(cache, "live", 0, 1000)
            assert remove_dead_pulls_leftovers(cache, expand) == Leftovers(1, 3000)  # the dead download only
            assert killed.is_dir() and not dead_partial.exists()

            owner.kill()  # SIGKILL: nothing of the owner runs, the kernel drops its lock
            owner.wait()
            leftovers = remove_dead_pulls_leftovers(cache, expand)

            assert not killed.exists() and leftovers == Leftovers(1, 5000)
            assert live.is_dir() and live_partial.exists()
            assert remove_leftovers(cache, expand).removed == 0  # the expire flow keeps a live owner's too
    finally:
        owner.kill()
        owner.wait()
    assert list(expand.iterdir()) == []


# --------------------------------------------------------------------------- through the pull and expire flows


def test_eviction_during_a_pull_keeps_its_layers_and_the_expire_flow_evicts_them_after(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway.write_config(CacheSizeLimit=1)
    push_image(gateway.registry, "sweep/old", "1", [LayerBuilder().file("old", os.urandom(20000))])
    state, record = pull(gateway, gateway.image("sweep/old:1"))
    assert state.is_completed(), record["status_message"]
    old_layers = LayerCache(gateway.cache_dir).layers()
    built = push_image(gateway.registry, "sweep/new", "1", [LayerBuilder().file("base", b"base layer\n"),
                                                            LayerBuilder().file("app", os.urandom(30000))])
    during: list[Eviction] = []
    real_holding = LayerCache.holding

    @contextmanager
    def holding_then_evicting(cache: LayerCache, digests: list[str]) -> Iterator[None]:
        # Another platform's expire flow runs as this pull starts to hold its layers (none is cached
        # yet), and again when the pull is done with them but still holds them.
        with real_holding(cache, digests):
            during.append(evict_layers(cache, SizeLimit(bytes=1)))
            yield
            during.append(evict_layers(cache, SizeLimit(bytes=1)))

    monkeypatch.setattr(LayerCache, "holding", holding_then_evicting)
    state, record = pull(gateway, gateway.image("sweep/new:1"))
    monkeypatch.undo()

    assert state.is_completed(), record["status_message"]
    assert read_tree(gateway.image_dir / f"{record['id']}.squashfs")["base"].data == b"base layer\n"
    # The old image's layers went at once; the new one's, once downloaded, were kept while it ran.
    assert during[0].evicted == len(old_layers) and during[0].held == []
    assert sorted(during[1].held) == sorted(built.layer_digests) and during[1].evicted == 0
    new_layers = LayerCache(gateway.cache_dir).layers()
    assert sorted(layer.digest for layer in new_layers) == sorted(built.layer_digests)

    result = expire_run(gateway)

    assert result["expired"] == []
    assert result["layers_evicted"] == 2 and result["layer_bytes_evicted"] == sum(layer.size for layer in new_layers)
    assert LayerCache(gateway.cache_dir).layers() == []
    with get_client(sync_client=True) as client:
        wanted = ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-cache-mycluster"]))
        artifacts = client.read_artifacts(artifact_filter=wanted)
    assert artifacts and "layers evicted" in str(artifacts[-1].data)


def test_the_expire_flow_removes_a_dead_pulls_scratch_directory(gateway: Gateway) -> None:
    dead = scratch(gateway.root / "expand", "pull-crashed", 30, b"z" * 1234)

    result = expire_run(gateway)

    assert not dead.exists()
    assert (result["leftovers_removed"], result["leftover_bytes_removed"]) == (1, 1234)
    assert result["layers_evicted"] == 0


def expire_run(gateway: Gateway) -> dict[str, object]:
    from flows.expire import expire_images  # imports Prefect, which conftest.py has configured by now

    return expire_images("mycluster", str(gateway.config_path))
