"""The expire stage: remove the files of images past their expiration, and forget old failed pulls."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from imagegw.config import Platform
from imagegw.expiry import ExpiryReport, expire_due
from imagegw.store import ImageStore
from tasks.retry import transient_failure


@task(name="expire", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def expire(store: ImageStore, platform: Platform, failures_kept_for: float) -> ExpiryReport:
    """Expire the platform's images past their expiration; leave a table of them for operators."""
    report = expire_due(store, platform, failures_kept_for)
    create_table_artifact(
        key=f"expire-{platform.name.lower()}",
        table=[{"image": image.id, "tags": ", ".join(image.tags), "MB freed": round(image.size / 1e6, 1)}
               for image in report.expired] or [{"image": "(none due)", "tags": "", "MB freed": 0}],
        description=f"Expired on {platform.name}: {len(report.expired)} images, "
                    f"{report.bytes_freed / 1e6:.1f} MB freed; {report.failures_cleared} failed pulls forgotten",
    )
    get_run_logger().info("%d images expired on %s (%.1f MB freed), %d failed pulls forgotten",
                          len(report.expired), platform.name, report.bytes_freed / 1e6, report.failures_cleared)
    return report
