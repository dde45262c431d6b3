"""The index stage: record the finished image in MongoDB, where lookups find it."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from imagegw.database import open_index
from imagegw.index import to_response
from imagegw.job import PullJob, image_facts
from imagegw.publish import PublishedImage, is_published, published_paths
from imagegw.registry import ResolvedImage
from tasks.retry import transient_failure


@task(name="index", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def index(job: PullJob, image: ResolvedImage, published: PublishedImage) -> dict[str, Any]:
    """Mark the image READY under the pulled tag; return its record as the API shows it."""
    record = open_index(job.settings).publish(job.key, image_facts(image, published.size))
    return to_response(record)


@task(name="check-published", cache_policy=NONE)
def find_published(job: PullJob, image: ResolvedImage) -> PublishedImage | None:
    """The image's files, if this digest is already READY on the platform (nothing to download or convert)."""
    record = open_index(job.settings).ready_image(job.key.system, image.image_id)
    squashfs, meta = published_paths(job.platform.image_dir, image.image_id)
    if record is None or not is_published(job.platform.image_dir, image.image_id):
        return None
    return PublishedImage(squashfs=squashfs, meta=meta, size=squashfs.stat().st_size)
