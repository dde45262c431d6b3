"""The scheduled expire flow: one deployment per platform, on the ``ExpireSchedule`` cron schedule."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import EXPIRE_FLOW
from imagegw.config import load_settings
from imagegw.store import open_store
from tasks.expire import expire


@flow(name=EXPIRE_FLOW, flow_run_name="expire {platform}")
def expire_images(platform: str, config: str | None = None) -> dict[str, Any]:
    """Remove the images of a platform that nobody pulled or looked up within ImageExpirationTimeout."""
    settings = load_settings(config)
    report = expire(open_store(settings), settings.platform(platform), settings.pull_update_timeout)
    return {"expired": [image.id for image in report.expired], "bytes_freed": report.bytes_freed,
            "failures_cleared": report.failures_cleared}
