"""The transfer stage: publish the squashfs and its .meta into the platform's image directory."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from imagegw.store.mongo import open_index
from imagegw.store.records import Access, Status
from imagegw.plan import PullJob, image_meta
from imagegw.publish.local import PublishedImage, publish_local
from imagegw.registry.client import ResolvedImage
from imagegw.build.squash import SquashResult
from tasks.retry import transient_failure


@task(name="transfer", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def transfer(job: PullJob, image: ResolvedImage, access: Access, squashfs: SquashResult | None) -> PublishedImage:
    """Move the image into place under its final names, atomically; without a new squashfs, refresh the .meta."""
    open_index(job.settings).set_stage(job.key, Status.TRANSFER, f"Publishing into {job.platform.image_dir}")
    return publish_local(squashfs.path if squashfs else None, image_meta(image, access), job.platform.image_dir,
                         image.image_id)
