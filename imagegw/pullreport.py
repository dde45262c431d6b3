"""What one pull did, for the operator watching it: where its layers came from, what was built,
where it went, and how long each stage took."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from imagegw.build import SquashResult
from imagegw.config import Compression, Platform
from imagegw.publish import PublishedImage
from imagegw.registry import ResolvedImage

STAGES = ("resolve", "pull", "unpack", "squash", "transfer", "index")
"""The pipeline's stages, in the order the report lists them."""


@dataclass(frozen=True)
class StageTime:
    """One stage's wall time: from its first start to its last end, retries included."""

    stage: str
    seconds: float


@dataclass(frozen=True)
class PullReport:
    """The record of one successful pull."""

    image: str
    platform: str
    manifest_digest: str
    architecture: str
    layers: int
    layers_fetched: int
    layers_cached: int
    bytes_downloaded: int
    already_ready: bool
    """The digest was READY on the platform: nothing was downloaded or built, the record was refreshed."""
    squashfs_size: int
    compression: str
    """The platform's compressor, as an operator reads it (``gzip level 1``); empty when nothing was built."""
    published: str
    """The squashfs's path in the platform's image directory (on its remote host for a remote platform)."""
    stages: tuple[StageTime, ...]


class PullRecorder:
    """Collects from the stages of one pull what its report says.

    pull, unpack and squash run side by side in threads of their own, so each stage is timed from
    its own start to its own end: the times overlap and do not add up to the pull's duration.
    """

    def __init__(self) -> None:
        self._spans: dict[str, tuple[float, float]] = {}
        self._fetched = 0
        self._cached = 0
        self._bytes = 0
        self._lock = threading.Lock()

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Time a run of ``stage``; a retried stage's span runs from its first start to its last end."""
        start = time.monotonic()
        try:
            yield
        finally:
            end = time.monotonic()
            with self._lock:
                first_start = self._spans.get(stage, (start, end))[0]
                self._spans[stage] = (min(first_start, start), end)

    def downloaded(self, fetched: int, cached: int, received: int) -> None:
        """The pull stage's layers: ``fetched`` from the registry (``received`` bytes), ``cached`` already in."""
        with self._lock:
            self._fetched, self._cached, self._bytes = fetched, cached, received

    def report(self, image: str, platform: Platform, resolved: ResolvedImage, squashfs: SquashResult | None,
               published: PublishedImage) -> PullReport:
        """The report of the pull of ``image`` whose stages recorded here; ``squashfs`` None: none was built."""
        with self._lock:
            stages = tuple(StageTime(stage, self._spans[stage][1] - self._spans[stage][0])
                           for stage in STAGES if stage in self._spans)
            return PullReport(
                image=image, platform=platform.name, manifest_digest=resolved.manifest_digest,
                architecture=str(resolved.config.get("architecture", "unknown")), layers=len(resolved.layers),
                layers_fetched=self._fetched, layers_cached=self._cached, bytes_downloaded=self._bytes,
                already_ready=squashfs is None, squashfs_size=published.size,
                compression=describe_compression(platform.compression) if squashfs else "",
                published=str(published.squashfs), stages=stages)


def describe_compression(compression: Compression) -> str:
    """``gzip level 1``, or ``lz4`` for a compressor without levels."""
    return compression.algorithm if compression.level is None else f"{compression.algorithm} level {compression.level}"
