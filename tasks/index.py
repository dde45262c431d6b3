"""The index stage, and the look-ups in the image index the flow makes before it."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from imagegw.access import Access
from imagegw.config import Settings
from imagegw.plan import PullPlan, plan_pull
from imagegw.publish import PublishedImage, Publisher
from imagegw.pullreport import PullRecorder
from imagegw.registry import ResolvedImage
from imagegw.registry.keychain import Keychain
from imagegw.store import ImageFacts, ImageStore, PullKey, PullTracker, to_response
from tasks.retry import transient_failure


# The look-ups before the stages are plain calls, not task runs: milliseconds of bookkeeping each, with nothing
# to retry, and every task run costs Prefect's server its records, events and logs (bench/README.md).
def plan(store: ImageStore, settings: Settings, key: PullKey) -> PullPlan:
    """Gather what the pull needs: the image's location, the requester's login and requested access."""
    return plan_pull(settings, key, handed=store.take_login(key), access=store.requested_access(key),
                     keychain=Keychain())


def settle_access(store: ImageStore, job: PullPlan, image: ResolvedImage) -> Access:
    """Who may read the image once published: public, or the ACL of private pulls."""
    return store.settle_access(job.key.system, image.image_id, job.access)


def is_ready(store: ImageStore, publisher: Publisher, job: PullPlan, image: ResolvedImage) -> bool:
    """Whether this digest is already READY on the platform, its files in place."""
    return store.ready_image(job.key.system, image.image_id) is not None and publisher.is_published(image.image_id)


@task(name="index", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def index(tracker: PullTracker, image: ResolvedImage, published: PublishedImage,
          access: Access, recorder: PullRecorder) -> dict[str, Any]:
    """Mark the image READY under the pulled tag; return its record as the API shows it."""
    with recorder.timing("index"):
        return to_response(tracker.publish(ImageFacts.of_image(image, published.size), access))
