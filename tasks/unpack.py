"""The unpack stage: flatten the layers, top down as they arrive, into the tar stream the squash stage reads."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.build import ImageTree, StreamedBuild
from imagegw.pullreport import PullRecorder


@task(name="unpack", cache_policy=NONE)
def unpack(build: StreamedBuild, recorder: PullRecorder) -> ImageTree:
    """Write the image into the build's stream while the layers download, and return its exact tree."""
    logger = get_run_logger()
    with recorder.timing("unpack"):
        image = build.write_image(warn=logger.warning)
    logger.info("image tree: %d entries, %.1f MB of file data; %d files streamed while the layers arrived%s",
                image.tree.entries, image.tree.file_bytes / 1e6, image.streamed_files,
                "" if image.intact else " (spoiled: the squashfs is built again from the tree)")
    return image.tree
