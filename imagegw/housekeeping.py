"""Keeping the gateway's own disks from filling: the layer cache held under ``CacheSizeLimit`` (the least
recently used layers go first, never one a running pull holds), and what dead pulls left behind.

The expire flow runs this, and a worker starting removes what pulls that died on its host left
(``remove_dead_pulls_leftovers``); the cache and the scratch space are shared by every platform on the
host, and every step is safe to run twice at once, so each platform's flow may run it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagegw.config import SizeLimit
from imagegw.disk import SCRATCH_LOCK, bytes_under, disk_errors, remove_abandoned_scratch
from imagegw.registry import LayerCache

LEFTOVER_AGE = 24 * 3600
"""Seconds a scratch directory without its owner's lock (see ``imagegw.disk.SCRATCH_LOCK``), or a partial
download, goes unwritten before it counts as a dead pull's. A live pull writes all the time (its files
grow as layers arrive), so nothing of one goes a day untouched; a day also leaves an operator time to look
at what a crash left."""

# The scratch directories of pulls (flows/pull.py) and imports (imagegw.service.gateway): only these are
# ours to remove, in case ExpandDirectory is shared with something else.
_SCRATCH_PREFIXES = ("pull-", "import-")


@dataclass(frozen=True)
class Eviction:
    """What one pass over the layer cache evicted to bring it under its cap."""

    cap: int
    """Bytes the cache may hold."""
    evicted: int = 0
    """Layers deleted."""
    bytes_evicted: int = 0
    held: list[str] = field(default_factory=list)
    """Digests of layers that would have gone but a running pull holds (or is downloading)."""
    bytes_cached: int = 0
    """What the cache holds afterwards (over the cap only when held layers keep it there)."""


@dataclass(frozen=True)
class Leftovers:
    """What a pass removed of dead pulls' scratch directories and partial downloads."""

    removed: int = 0
    bytes_removed: int = 0


def evict_layers(cache: LayerCache, limit: SizeLimit) -> Eviction:
    """Delete the least recently used layers until the cache holds no more than ``limit``."""
    cap = limit.of(_filesystem_size(cache.root))
    layers = cache.layers()
    cached = sum(layer.size for layer in layers)
    evicted = freed = 0
    held = []
    for layer in layers:
        if cached <= cap:
            break
        with disk_errors(cache.root, f"evicting layer {layer.digest}"):
            removed = cache.evict(layer.digest)
        if removed is None:
            held.append(layer.digest)
            continue
        # A layer another sweep removed meanwhile frees nothing here, but is gone all the same.
        cached -= layer.size
        evicted += 1
        freed += removed
    return Eviction(cap=cap, evicted=evicted, bytes_evicted=freed, held=held, bytes_cached=cached)


def remove_leftovers(cache: LayerCache, expand_dir: Path, now: float | None = None) -> Leftovers:
    """Remove what dead pulls left: scratch directories whose owner's lock is free, and scratch directories
    without one and partial downloads nobody wrote to for ``LEFTOVER_AGE``."""
    cutoff = (time.time() if now is None else now) - LEFTOVER_AGE

    def scratch_if_dead(scratch: Path) -> int | None:
        if (scratch / SCRATCH_LOCK).exists():
            return remove_abandoned_scratch(scratch)
        return _remove_if_older(scratch, cutoff)

    def partial_if_old(partial: Path) -> int | None:
        return _remove_partial_if_older(cache, partial, cutoff)

    return _removed(cache, expand_dir, scratch_if_dead, partial_if_old)


def remove_dead_pulls_leftovers(cache: LayerCache, expand_dir: Path) -> Leftovers:
    """Remove, whatever their age, the scratch directories and partial downloads of pulls (and imports) that
    died on this host, as their free locks show: a worker does this as it starts, so a killed pull's files do
    not wait a day for the expire flow. A live pull's, on another worker of this host, hold their locks.

    A partial download is written only under its layer's download lock (``imagegw.registry.layercache``),
    so one whose lock is free is a dead download's."""
    return _removed(cache, expand_dir, remove_abandoned_scratch, cache.remove_partial)


def _removed(cache: LayerCache, expand_dir: Path, scratch_rule: Callable[[Path], int | None],
             partial_rule: Callable[[Path], int | None]) -> Leftovers:
    """Each scratch directory and partial download given to its rule, which removes it (the bytes freed) or
    leaves it (None); what they removed."""
    sizes = []
    for scratch in _scratch_directories(expand_dir):
        with disk_errors(scratch, "removing the scratch directory of a dead pull"):
            sizes.append(scratch_rule(scratch))
    for partial in cache.partials():
        with disk_errors(partial, "removing the partial download of a dead pull"):
            sizes.append(partial_rule(partial))
    removed = [size for size in sizes if size is not None]
    return Leftovers(removed=len(removed), bytes_removed=sum(removed))


def _remove_if_older(scratch: Path, cutoff: float) -> int | None:
    """Remove a scratch directory last written before ``cutoff``: the bytes freed, or None if it stays."""
    try:
        if _last_written(scratch) >= cutoff:
            return None
        size = bytes_under(scratch)
        shutil.rmtree(scratch)
    except FileNotFoundError:  # its pull just ended and removed it, or another sweep is at it
        return None
    return size


def _remove_partial_if_older(cache: LayerCache, partial: Path, cutoff: float) -> int | None:
    """Remove a partial download last written before ``cutoff`` whose layer nobody downloads."""
    try:
        if partial.stat().st_mtime >= cutoff:
            return None
    except FileNotFoundError:  # its download just finished
        return None
    return cache.remove_partial(partial)


def _filesystem_size(path: Path) -> int:
    """Bytes of the filesystem that ``path`` is on (or will be, once created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_blocks * stats.f_frsize


def _scratch_directories(expand_dir: Path) -> list[Path]:
    if not expand_dir.is_dir():
        return []
    return sorted(path for path in expand_dir.iterdir()
                  if path.name.startswith(_SCRATCH_PREFIXES) and path.is_dir() and not path.is_symlink())


def _last_written(directory: Path) -> float:
    """The newest mtime of ``directory`` and everything in it: a file being written keeps it young."""
    newest = directory.lstat().st_mtime
    for parent, _, files in os.walk(directory):
        for name in files:
            newest = max(newest, (Path(parent) / name).lstat().st_mtime)
        newest = max(newest, Path(parent).lstat().st_mtime)
    return newest

