"""Building an image's squashfs: layers flattened (top down while they download) into one tar stream
that tar2sqfs compresses, and the result checked."""

from imagegw.build.arrivals import LayerArrivals
from imagegw.build.flatten import ImageTree, LayerSource, flatten_layers, prepare_layer
from imagegw.build.squash import (
    SquashResult,
    build_squashfs,
    build_squashfs_streamed,
    list_squashfs,
)
from imagegw.build.stream import (
    ImageStream,
    StreamedBuild,
    StreamedImage,
    streamed_build,
)

__all__ = [
    "ImageStream",
    "ImageTree",
    "LayerArrivals",
    "LayerSource",
    "SquashResult",
    "StreamedBuild",
    "StreamedImage",
    "build_squashfs",
    "build_squashfs_streamed",
    "flatten_layers",
    "list_squashfs",
    "prepare_layer",
    "streamed_build",
]
