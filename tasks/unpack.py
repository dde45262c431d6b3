"""The unpack stage: apply the layers, with OCI whiteout rules, into one image tree."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.database import open_index
from imagegw.flatten import ImageTree, LayerSource, flatten_layers
from imagegw.index import Status
from imagegw.job import PullJob
from imagegw.registry import ResolvedImage


@task(name="unpack", cache_policy=NONE)
def unpack(job: PullJob, image: ResolvedImage, layer_paths: list[Path]) -> ImageTree:
    """Flatten the layers, base first, into the tree the squashfs will hold."""
    open_index(job.settings).set_stage(job.key, Status.EXAMINATION, f"Applying {len(layer_paths)} layers")
    logger = get_run_logger()
    layers = [LayerSource(path=path, digest=layer.digest) for path, layer in zip(layer_paths, image.layers)]
    tree = flatten_layers(layers, warn=logger.warning)
    logger.info("image tree: %d entries, %.1f MB of file data", tree.entries, tree.file_bytes / 1e6)
    return tree
