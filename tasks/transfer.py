"""The transfer stage: publish the squashfs and its .meta into the platform's image directory."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from imagegw.access import Access
from imagegw.build import SquashResult
from imagegw.publish import PublishedImage, Publisher, image_meta
from imagegw.pullreport import PullRecorder
from imagegw.registry import ResolvedImage
from imagegw.store import PullTracker, Status
from tasks.retry import transient_failure


@task(name="transfer", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def transfer(publisher: Publisher, image: ResolvedImage, access: Access, squashfs: SquashResult | None,
             tracker: PullTracker, recorder: PullRecorder) -> PublishedImage:
    """Move the image into place under its final names, atomically; without a new squashfs, refresh the .meta."""
    tracker.stage(Status.TRANSFER, f"Publishing into {publisher}")
    with recorder.timing("transfer"):
        return publisher.publish(squashfs.path if squashfs else None, image_meta(image, access), image.image_id)
