"""Keeping the gateway's own disks from filling: the layer cache held under ``CacheSizeLimit`` (the least
recently used layers go first, never one a running pull holds), and what dead pulls left behind.

The expire flow runs this; the cache and the scratch space are shared by every platform on the host,
and every step is safe to run twice at once, so each platform's flow may run it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from imagegw.config import SizeLimit
from imagegw.disk import disk_errors
from imagegw.registry import LayerCache

LEFTOVER_AGE = 24 * 3600
"""Seconds a scratch directory or partial download goes unwritten before it counts as a dead pull's.
A live pull writes all the time (its heartbeat is minutes apart, its files grow as layers arrive), so
nothing of one goes a day untouched; a day also leaves an operator time to look at what a crash left."""

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
    """Remove the scratch directories and partial downloads nobody wrote to for ``LEFTOVER_AGE``."""
    cutoff = (time.time() if now is None else now) - LEFTOVER_AGE
    removed = freed = 0
    for scratch in _scratch_directories(expand_dir):
        with disk_errors(scratch, "removing the scratch directory of a dead pull"):
            size = _remove_if_older(scratch, cutoff)
        if size is not None:
            removed, freed = removed + 1, freed + size
    for partial in cache.partials():
        with disk_errors(partial, "removing the partial download of a dead pull"):
            size = _remove_partial_if_older(cache, partial, cutoff)
        if size is not None:
            removed, freed = removed + 1, freed + size
    return Leftovers(removed=removed, bytes_removed=freed)


def _remove_if_older(scratch: Path, cutoff: float) -> int | None:
    """Remove a scratch directory last written before ``cutoff``: the bytes freed, or None if it stays."""
    try:
        if _last_written(scratch) >= cutoff:
            return None
        size = _bytes_under(scratch)
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


def _bytes_under(directory: Path) -> int:
    return sum((Path(parent) / name).lstat().st_size for parent, _, files in os.walk(directory) for name in files)
