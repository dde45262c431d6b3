"""The squash stage: write the image tree into a squashfs file."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.database import open_index
from imagegw.flatten import ImageTree
from imagegw.index import Status
from imagegw.job import PullJob
from imagegw.squash import SquashResult, build_squashfs


@task(name="squash", cache_policy=NONE)
def squash(job: PullJob, tree: ImageTree, scratch: Path) -> SquashResult:
    """Build and verify the squashfs in the scratch directory."""
    compression = job.platform.compression
    open_index(job.settings).set_stage(job.key, Status.CONVERSION, f"Building squashfs ({compression})")
    result = build_squashfs(tree, scratch / "image.squashfs", compression, job.platform.block_size)
    get_run_logger().info("squashfs: %.1f MB, %d entries (%s)", result.size / 1e6, result.entries, compression)
    return result
