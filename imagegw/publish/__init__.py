"""Putting finished images where the runtime finds them: the squashfs, Shifter's ``.meta`` beside it,
and squashfs files users import."""

from imagegw.config import Platform
from imagegw.publish.importer import ImportedFile, copy_importable
from imagegw.publish.local import LocalPublisher, PublishedImage
from imagegw.publish.shifter_meta import image_meta, render_meta


def publisher_for(platform: Platform) -> LocalPublisher:
    """What publishes images into ``platform``'s image directory."""
    return LocalPublisher(platform.image_dir)


__all__ = [
    "ImportedFile",
    "LocalPublisher",
    "PublishedImage",
    "copy_importable",
    "image_meta",
    "publisher_for",
    "render_meta",
]
