"""The squash stage: compress the image's tar stream into a squashfs file as the unpack stage writes it."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.plan import PullJob
from imagegw.build.squash import ImageStream, SquashResult, build_squashfs_streamed


@task(name="squash", cache_policy=NONE)
def squash(job: PullJob, stream: ImageStream, scratch: Path) -> SquashResult:
    """Build and verify the squashfs in the scratch directory."""
    compression = job.platform.compression
    result = build_squashfs_streamed(stream, scratch / "image.squashfs", compression, job.platform.block_size)
    get_run_logger().info("squashfs: %.1f MB, %d entries (%s)", result.size / 1e6, result.entries, compression)
    return result
