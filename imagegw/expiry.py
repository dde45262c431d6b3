"""Expiring images: the files of images nobody pulled or looked up lately are removed, their records
marked EXPIRED, and failed pulls forgotten once pollers have had time to see them.

The same work serves the admins' ``/api/expire`` and ``/api/autoexpire`` calls and the scheduled
expire flow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imagegw.config import Platform
from imagegw.publish import Publisher, publisher_for
from imagegw.store import ImageStore, Status


@dataclass(frozen=True)
class ExpiredImage:
    """An image whose files were removed."""

    id: str
    tags: list[str]
    size: int
    """Bytes its squashfs took."""


@dataclass(frozen=True)
class ExpiryReport:
    """What one expiry pass over a platform did."""

    platform: str
    expired: list[ExpiredImage] = field(default_factory=list)
    failures_cleared: int = 0

    @property
    def bytes_freed(self) -> int:
        return sum(image.size for image in self.expired)


def expire_image(store: ImageStore, platform: Platform, publisher: Publisher,
                 record: dict[str, object]) -> ExpiredImage:
    """Remove one image's files and mark it EXPIRED (EXPIRING meanwhile, so lookups stop finding it first)."""
    image_id = str(record["id"])
    store.set_image_status(platform.name, image_id, Status.EXPIRING, "Removing image files")
    publisher.unpublish(image_id)
    store.set_image_status(platform.name, image_id, Status.EXPIRED, "Expired")
    tags = record.get("tag")
    size = record.get("size")
    return ExpiredImage(image_id, list(tags) if isinstance(tags, list) else [],
                        size if isinstance(size, int) else 0)


def expire_due(store: ImageStore, platform: Platform, failures_kept_for: float) -> ExpiryReport:
    """Expire every image of ``platform`` past its expiration, over one publisher connection, and forget
    FAILURE pulls older than ``failures_kept_for`` seconds."""
    now = time.time()
    due = store.due_for_expiry(platform.name, now)
    expired = []
    if due:
        with publisher_for(platform) as publisher:
            expired = [expire_image(store, platform, publisher, record) for record in due]
    cleared = store.clear_failures(platform.name, now - failures_kept_for)
    return ExpiryReport(platform.name, expired, cleared)
