"""The unpack stage: flatten the layers, top down as they arrive, into the tar stream the squash stage reads."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.build.arrivals import LayerArrivals
from imagegw.build.flatten import ImageTree
from imagegw.build.squash import ImageStream
from imagegw.build.stream import flatten_top_down


@task(name="unpack", cache_policy=NONE)
def unpack(arrivals: LayerArrivals, stream: ImageStream) -> ImageTree:
    """Write the image into ``stream`` while the layers download, and return its exact tree."""
    logger = get_run_logger()
    try:
        image = flatten_top_down(arrivals, stream.writer, warn=logger.warning)
    except BaseException as exc:
        stream.fail(exc)
        raise
    stream.finish(image)
    logger.info("image tree: %d entries, %.1f MB of file data; %d files streamed while the layers arrived%s",
                image.tree.entries, image.tree.file_bytes / 1e6, image.streamed_files,
                "" if image.intact else " (spoiled: the squashfs is built again from the tree)")
    return image.tree
