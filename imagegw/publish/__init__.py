"""Putting finished images where the runtime finds them: the squashfs, Shifter's ``.meta`` beside it,
in a platform's image directory on this host or over SSH; and squashfs files users import."""

from imagegw.config import Platform
from imagegw.publish.importer import ImportedFile, copy_importable
from imagegw.publish.local import LocalPublisher
from imagegw.publish.publisher import PublishedImage, Publisher
from imagegw.publish.remote import RemotePublisher
from imagegw.publish.shifter_meta import image_meta, render_meta


def publisher_for(platform: Platform) -> Publisher:
    """What publishes images into ``platform``'s image directory (use it as a context manager)."""
    if platform.remote is not None:
        return RemotePublisher(platform.remote, platform.image_dir)
    return LocalPublisher(platform.image_dir)


__all__ = [
    "ImportedFile",
    "LocalPublisher",
    "PublishedImage",
    "Publisher",
    "RemotePublisher",
    "copy_importable",
    "image_meta",
    "publisher_for",
    "render_meta",
]
