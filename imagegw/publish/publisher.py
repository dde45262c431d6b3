"""What publishes images into a platform's image directory, wherever that directory is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

IMAGE_FILE_MODE = 0o600
"""The runtime reads images as root; Shifter publishes 0600 so that private images stay private."""


@dataclass(frozen=True)
class PublishedImage:
    """An image's files in a platform's image directory (on the host that holds it)."""

    squashfs: Path
    meta: Path
    size: int


class Publisher(Protocol):
    """Puts images where the runtime opens them by name: ``<imageDir>/<id>.squashfs`` and ``<id>.meta``.

    A reader never sees a partial file under either name, and a ``.meta`` always has its image
    beside it. Used as a context manager: whatever it holds open (a connection) is closed on exit.
    """

    def is_published(self, image_id: str) -> bool:
        """Whether both of an image's files are in place."""
        ...

    def publish(self, squashfs: Path | None, meta_text: str, image_id: str) -> PublishedImage:
        """Put a built squashfs and its ``.meta`` in place; without a squashfs, only rewrite the ``.meta``."""
        ...

    def unpublish(self, image_id: str) -> None:
        """Remove an image's files (the ``.meta`` first)."""
        ...

    def free_bytes(self) -> int | None:
        """Bytes free now in the image directory's filesystem (None: it cannot tell)."""
        ...

    def __enter__(self) -> Publisher: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None: ...
