"""The squash stage: compress the image's tar stream into a squashfs file as the unpack stage writes it."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.build import ImageStream, SquashResult, build_squashfs_streamed
from imagegw.config import Compression
from imagegw.pullreport import PullRecorder


@task(name="squash", cache_policy=NONE)
def squash(stream: ImageStream, output: Path, compression: Compression, block_size: int,
           recorder: PullRecorder) -> SquashResult:
    """Build the squashfs at ``output`` from the stream, and check it against the image."""
    with recorder.timing("squash"):
        result = build_squashfs_streamed(stream, output, compression, block_size)
    get_run_logger().info("squashfs: %.1f MB, %d entries (%s)", result.size / 1e6, result.entries, compression)
    return result
