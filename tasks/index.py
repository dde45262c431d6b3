"""The index stage, and the index look-ups the flow makes before it."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from imagegw.config import Settings
from imagegw.store.mongo import open_index
from imagegw.store.records import Access, PullKey, to_response
from imagegw.plan import PullJob, image_facts, plan_pull
from imagegw.publish.local import PublishedImage, is_published
from imagegw.registry.client import ResolvedImage
from tasks.retry import transient_failure


# The job carries the requester's registry login: it must never be persisted as a result.
@task(name="plan", cache_policy=NONE, persist_result=False)
def plan(settings: Settings, key: PullKey) -> PullJob:
    """Gather what the pull needs: the image's location, the requester's login and requested access."""
    index = open_index(settings)
    return plan_pull(settings, key, login=index.take_login(key), access=index.requested_access(key))


@task(name="settle-access", cache_policy=NONE)
def settle_access(job: PullJob, image: ResolvedImage) -> Access:
    """Who may read the image once published: public, or the ACL of private pulls."""
    return open_index(job.settings).settle_access(job.key.system, image.image_id, job.access)


@task(name="check-published", cache_policy=NONE)
def is_ready(job: PullJob, image: ResolvedImage) -> bool:
    """Whether this digest is already READY on the platform, its files in place."""
    record = open_index(job.settings).ready_image(job.key.system, image.image_id)
    return record is not None and is_published(job.platform.image_dir, image.image_id)


@task(name="index", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def index(job: PullJob, image: ResolvedImage, published: PublishedImage, access: Access) -> dict[str, Any]:
    """Mark the image READY under the pulled tag; return its record as the API shows it."""
    record = open_index(job.settings).publish(job.key, image_facts(image, published.size), access)
    return to_response(record)
